from architectures import TINY
from densenet import DenseNet
from densenet.tools.summary import _measure, summarize


def test_macs_are_counted_on_the_memory_efficient_path_too():
    # Its blocks and transitions call convolutions as functions, which module hooks never saw.
    standard = {stage.name: stage.macs for stage in summarize(DenseNet(**TINY), (32, 32)).stages}
    efficient = summarize(DenseNet(**TINY, memory_efficient=True), (32, 32))
    for stage in efficient.stages:
        # A memory-efficient transition pools before its 1x1 convolution: a quarter of the work.
        share = 4 if stage.name.startswith("transition") else 1
        assert stage.macs == standard[stage.name] // share > 0, stage.name


def test_a_large_batch_is_extrapolated_exactly_from_two_small_runs():
    model = DenseNet(**TINY)
    measured = _measure(model, (32, 32), 7)
    extrapolated = summarize(model, (32, 32), 7)
    assert extrapolated.batch_size == 7
    assert [s.activation_bytes for s in extrapolated.stages] == [
        s.activation_bytes for s in measured.stages
    ]
    assert [s.macs for s in extrapolated.stages] == [s.macs for s in measured.stages]
