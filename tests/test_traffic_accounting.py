"""tf_zero.traffic: the bytes a traced step sends, against bytes computed by hand.

Every step here is traced, never run. N = 4 replicas; a float32 tensor of M
bytes costs a replica 2M(N-1)/N in an all-reduce, M(N-1)/N in a reduce-scatter
or all-to-all, and an all-gather of m bytes a replica m(N-1).
"""

import keras
import pytest
import tensorflow as tf
from conftest import mirrored_strategy, mlp, regression_data, zero_strategy

import tf_zero
from tf_zero import collectives, traffic
from tf_zero.traffic import traced_ops

N = 4
SHARE = (N - 1) / N
PARAMS = 8 * 7 + 7 + 7 * 3 + 3  # conftest.mlp(): 87 float32 weights
PSI = 4 * PARAMS
ITERATIONS_COPIES = 3 * 8 / N  # Keras' int64 step counter, first device -> 3 others
ADAM = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
SGD = lambda: keras.optimizers.SGD(0.1)  # noqa: E731


# ---- the formulas and scopes, without TensorFlow --------------------------

def test_sent_bytes_by_kind_and_destination():
    assert traffic.sent_bytes("all_reduce", 400, 4) == (600.0, 0.0)
    # 2 workers x 2: a quarter of each pass stays on the worker, half leaves.
    assert traffic.sent_bytes("all_reduce", 400, 4, members_on_worker=2) == (200.0, 400.0)
    assert traffic.sent_bytes("reduce_scatter", 400, 4, 2) == (100.0, 200.0)
    assert traffic.sent_bytes("all_to_all", 400, 4, 2) == (100.0, 200.0)
    assert traffic.sent_bytes("all_gather", 100, 4, 2) == (100.0, 200.0)
    assert traffic.sent_bytes("broadcast", 100, 4) == (75.0, 0.0)
    assert traffic.sent_bytes("all_reduce", 400, 1) == (0.0, 0.0)
    with pytest.raises(ValueError, match="kinds"):
        traffic.sent_bytes("all_sum", 4, 2)


def test_sizes_come_from_a_second_trace_only_where_missing_and_unambiguous():
    def transfer(name, shape, device="/cpu:0"):
        return traced_ops.Transfer(
            name=name, op_type="CollectiveReduceV2", kind="all_reduce", device=device,
            dtype="float32", shape=shape, group_size=4, group_key=1, instance_key=None,
            function="f", branches=(), loops=())

    fit_step = [transfer("a", (None,)), transfer("b", (8,)), transfer("c", (None,)),
                transfer("a", (None,), "/cpu:1")]
    full_batches = [transfer("a", (96,)), transfer("b", (9,)), transfer("c", (5,)),
                    transfer("c", (6,)), transfer("a", (96,), "/cpu:1")]
    sized = traced_ops.with_sizes_from(fit_step, full_batches)
    assert [t.shape for t in sized] == [(96,), (8,), (None,), (96,)]  # "c" is ambiguous
    assert [t.sized_by for t in sized] == ["full-batch trace", "trace", "trace",
                                           "full-batch trace"]


def test_name_scope_finds_the_link_under_replica_and_keras_prefixes():
    assert traffic.name_scope("replica_2/zero_adam_3/zero_reduce/CollectiveAllToAllV2") == (
        "zero_reduce")
    assert traffic.name_scope("model/dense_1/Cast/zero_gather/CollectiveGatherV2") == "zero_gather"
    assert traffic.name_scope("zero_gather_grad_5/CollectiveAllToAllV2") == "zero_gather_grad"
    assert traffic.name_scope("replica_1/adam_w_1/CollectiveReduceV2_3") == "adam_w"
    assert traffic.name_scope("Identity_1") == "(top level)"


# ---- hand-written steps ----------------------------------------------------

def _links():
    """One collective per tf_zero link, on known sizes (replica context)."""
    with tf.name_scope("zero_reduce"):
        a = collectives.reduce_scatter(tf.zeros([N * 10]))  # 160 B
    with tf.name_scope("zero_publish"):
        b = collectives.all_gather(tf.zeros([6]))  # 24 B from each replica
    with tf.name_scope("zero_statistics"):
        c = collectives.all_reduce_sum(tf.zeros([5], tf.float16))  # 10 B
    return a, b, c


def test_hand_written_collectives_match_hand_computed_bytes():
    strategy = zero_strategy(N)
    step = tf.function(lambda: strategy.run(_links))
    report = tf_zero.collective_traffic(step, strategy=strategy)
    expected = {"zero_reduce": 160 * SHARE, "zero_publish": 24 * (N - 1),
                "zero_statistics": 2 * 10 * SHARE}
    assert report.by_scope == expected
    assert report.by_kind == {"all_to_all": 120, "all_gather": 72, "all_reduce": 15}
    assert report.bytes_per_replica == sum(expected.values()) == 207
    assert report.inside_bytes_per_replica == 207 and report.across_bytes_per_replica == 0
    launcher = strategy.extended._cross_device_ops._launchers[0]
    assert len(report.ops) == 3 * N and not report.dynamic
    assert {(op.group_size, op.group_key) for op in report.ops} == {(N, launcher._group_key)}
    assert [op.shape for op in report.ops[:3]] == [(N, 10), (6,), (5,)]
    assert [op.dtype for op in report.ops[:3]] == ["float32", "float32", "float16"]
    # Read as 2 workers x 2 devices: of each pass, 1/4 stays, 2/4 leaves.
    split = tf_zero.collective_traffic(step, strategy=strategy, workers=2)
    assert (split.workers, split.devices_per_worker) == (2, 2)
    assert split.inside_bytes_per_replica == 40 + 24 + 5
    assert split.across_bytes_per_replica == 80 + 48 + 10
    assert "zero_statistics" in str(split) and "across workers" in str(split)


def test_replica_context_fallback_moves_bytes_as_device_copies():
    """Without collective launchers (ReductionToOneDevice) the sum is copies to
    the first device and back: on average the ring's 2M(N-1)/N, all through
    the first device; the reduce-scatter fallback (all-reduce and a slice) twice
    the all-to-all's bytes."""
    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(N)], cross_device_ops=tf.distribute.ReductionToOneDevice())

    def body():
        with tf.name_scope("zero_statistics"):
            collectives.all_reduce_sum(tf.zeros([10]))  # 40 B
        with tf.name_scope("zero_reduce"):
            collectives.reduce_scatter(tf.zeros([N * 10]))  # 160 B
    report = tf_zero.collective_traffic(tf.function(lambda: strategy.run(body)),
                                        strategy=strategy)
    assert set(report.by_kind) == {"copy"}
    assert report.by_scope["zero_statistics"] == 2 * 40 * SHARE
    assert report.by_scope["zero_reduce"] == 2 * (160 * SHARE)
    sends = sorted(report.select(scope="zero_statistics").by_device.values())
    assert sends == [40, 40, 40, 3 * 40]


def _raw(kind, x, key=7):
    common = dict(group_size=N, group_key=key, instance_key=1, ordering_token=[])
    if kind == "reduce":
        return tf.raw_ops.CollectiveReduceV2(input=x, merge_op="Add", final_op="Id", **common)
    return tf.raw_ops.CollectiveGatherV2(input=x, **common)


@tf.function
def _inner(x):
    return _raw("reduce", x)


def _nested_step():
    """A function called twice, a cond branch and a while loop (one device)."""
    @tf.function
    def step(flag):
        with tf.device("/cpu:0"):
            a = _inner(tf.zeros([8])) + _inner(tf.ones([8]))  # 32 B, twice
            b = tf.cond(flag, lambda: _raw("gather", tf.zeros([2])),  # 8 B
                        lambda: tf.zeros([2 * N]))
            _, c = tf.while_loop(lambda i, v: i < 3,
                                 lambda i, v: (i + 1, _raw("reduce", v)),  # 16 B
                                 (tf.constant(0), tf.zeros([4])))
        return a, b, c

    return step.get_concrete_function(tf.TensorSpec([], tf.bool))


def test_function_bodies_count_once_per_call_and_conds_only_when_taken():
    report = tf_zero.collective_traffic(_nested_step(), devices_per_worker=N)
    calls = 2 * (2 * 32 * SHARE)
    gather = 8 * (N - 1)
    loop = 2 * 16 * SHARE
    assert report.replicas == 1 and report.workers == 1
    assert report.bytes_per_replica == calls + gather + loop
    assert report.inside_bytes_per_replica == report.bytes_per_replica  # one worker
    assert report.least_bytes_per_replica == calls + loop
    (branch,) = report.by_branch
    assert branch.endswith(":then") and report.by_branch[branch] == gather
    assert [bool(op.loop) for op in report.ops] == [False, False, False, True]
    assert all(op.function for op in report.ops)
    assert "ops inside while loops count once per iteration" in str(report)


def test_an_imported_graph_def_reads_as_the_traced_function():
    traced = _nested_step()
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(traced.graph.as_graph_def(), name="")
    imported = tf_zero.collective_traffic(graph, devices_per_worker=N)
    original = tf_zero.collective_traffic(traced, devices_per_worker=N)
    assert imported.bytes_per_replica == original.bytes_per_replica
    assert imported.least_bytes_per_replica == original.least_bytes_per_replica


def test_dynamic_shapes_are_listed_not_guessed():
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def step(x):
        with tf.device("/cpu:0"):
            return _raw("gather", x), _raw("reduce", tf.zeros([4]))

    report = tf_zero.collective_traffic(step, devices_per_worker=N)
    (dynamic,) = report.dynamic
    assert dynamic.kind == "all_gather" and dynamic.elements is None and dynamic.shape == (None,)
    assert report.bytes_per_replica == 2 * 16 * SHARE
    assert "not counted, size or group not static (1 ops)" in str(report)


def test_nccl_broadcast_and_communicator_collectives_are_accounted():
    """Traced only (no GPU): NCCL's all-reduce, a broadcast's send and
    receive, and the communicator-based all-reduce, on 2 devices."""
    @tf.function
    def step():
        outs = []
        for i in range(2):
            with tf.device(f"/cpu:{i}"):
                outs.append(tf.raw_ops.NcclAllReduce(input=tf.zeros([10]), reduction="sum",
                                                     num_devices=2, shared_name="s"))
                if i == 0:
                    outs.append(tf.raw_ops.CollectiveBcastSendV2(
                        input=tf.zeros([6]), group_size=2, group_key=3, instance_key=1))
                else:
                    outs.append(tf.raw_ops.CollectiveBcastRecvV2(
                        group_size=2, group_key=3, instance_key=1, shape=[6], T=tf.float32))
                communicator = tf.raw_ops.CollectiveInitializeCommunicator(
                    group_key=5, rank=i, group_size=2)
                outs.append(tf.raw_ops.CollectiveReduceV3(
                    input=tf.zeros([8]), communicator=communicator,
                    group_assignment=tf.constant([[0, 1]]), reduction="Add"))
        return outs

    report = tf_zero.collective_traffic(step)
    assert report.replicas == 2 and not report.dynamic
    assert {op.op_type: op.bytes_sent for op in report.ops} == {
        "NcclAllReduce": 40.0, "CollectiveBcastSendV2": 12.0, "CollectiveBcastRecvV2": 12.0,
        "CollectiveReduceV3": 32.0}
    assert {op.group_key for op in report.ops} == {"s", 3, 5}
    assert report.bytes_per_replica == 40 + 12 + 32


def test_layout_and_input_errors_name_the_fix():
    strategy = zero_strategy(N)
    step = tf.function(lambda: strategy.run(_links))
    with pytest.raises(ValueError, match="devices_per_worker too"):
        tf_zero.collective_traffic(step, workers=3)
    with pytest.raises(ValueError, match="pass the layout"):
        tf_zero.collective_traffic(step, workers=1, devices_per_worker=2)
    with pytest.raises(ValueError, match="positive int"):
        tf_zero.collective_traffic(step, workers=0)
    with pytest.raises(TypeError, match="tf.function"):
        tf_zero.collective_traffic(42)
    model = _compiled(mirrored_strategy(N), SGD)
    x, y = regression_data()
    with pytest.raises(ValueError, match="batch_size="):
        tf_zero.collective_traffic(model, x, y)
    with pytest.raises(ValueError, match="batch_size="):  # no static batch dimension
        tf_zero.collective_traffic(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(10))
    with pytest.raises(ValueError, match="multiple of the replica count"):
        tf_zero.collective_traffic(model, x, y, batch_size=10)


# ---- Keras' fit step ---------------------------------------------------------

def _compiled(strategy, optimizer, **compile_kwargs):
    """conftest.mlp() compiled under `strategy` with `optimizer()` (mse)."""
    with strategy.scope():
        model = mlp()
        model.compile(optimizer=optimizer(), loss="mse", **compile_kwargs)
    return model


def _fit_step(model, **kwargs):
    x, y = regression_data()
    return tf_zero.collective_traffic(model, x, y, batch_size=16, **kwargs)


def test_mirrored_fit_step_all_reduces_exactly_the_gradients():
    """Keras under MirroredStrategy all-reduces every gradient in one packed
    float32 all-reduce; besides it only the optimizer's int64 step counter
    moves (written on the first device, copied to the other replicas). The
    loss and metrics are averaged from each replica's local values, without
    communication, in one process."""
    report = _fit_step(_compiled(mirrored_strategy(N), ADAM,
                                 metrics=["mae"]))
    grads = report.select(kind="all_reduce")
    assert [op.elements for op in grads.ops] == [PARAMS] * N
    assert {(op.dtype, op.scope) for op in grads.ops} == {("float32", "adam")}
    assert grads.bytes_per_replica == 2 * PSI * SHARE
    copies = report.select(kind="copy")
    assert {(op.dtype, op.shape) for op in copies.ops} == {("int64", ())}
    assert copies.bytes_per_replica == ITERATIONS_COPIES
    assert set(report.by_kind) == {"all_reduce", "copy"} and not report.dynamic
    # A dataset whose batch dimension is unknown, as fit's input is: traced
    # on full batches, the same bytes.
    x, y = regression_data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    model = _compiled(mirrored_strategy(N), ADAM)
    assert tf_zero.collective_traffic(model, dataset, batch_size=16).bytes_per_replica == (
        report.bytes_per_replica)
    split = _fit_step(_compiled(mirrored_strategy(N), ADAM), workers=2)
    # Of the counter: CPU:0 -> CPU:1 stays on worker 0, -> CPU:2, CPU:3 leaves.
    assert split.inside_bytes_per_replica == 2 * PSI / N + 8 / N
    assert split.across_bytes_per_replica == 2 * PSI * 2 / N + 16 / N


def test_steps_per_execution_loop_counts_per_iteration():
    """steps_per_execution=2 runs Keras' step inside a while loop, under a
    cond on the data left: one iteration is one step, as before."""
    model = _compiled(mirrored_strategy(N), ADAM, steps_per_execution=2)
    report = _fit_step(model)
    assert report.bytes_per_replica == 2 * PSI * SHARE + ITERATIONS_COPIES
    assert all(op.loop and op.branch for op in report.ops)
    assert report.least_bytes_per_replica == 0  # the branch without data left


def _zero_model(stage, **kwargs):
    strategy = zero_strategy(N, stage=stage, **{k: v for k, v in kwargs.items()
                                                if k != "accumulation_steps"})
    steps = kwargs.get("accumulation_steps", 1)
    return _compiled(strategy, lambda: tf_zero.ZeroOptimizer(ADAM(), accumulation_steps=steps))


@pytest.mark.parametrize("stage", [1, 2])
def test_stages_1_and_2_move_the_gradient_allreduce_plus_padding(stage):
    """A reduce-scatter of the gradients and an all-gather of the weights:
    MirroredStrategy's 2 Psi (N-1)/N, with the bucket padded from 87 to 88."""
    model = _zero_model(stage)
    report = _fit_step(model)
    (bucket,) = model.optimizer.plan.buckets
    assert (bucket.size, bucket.padded_size) == (PARAMS, 88)
    assert report.by_scope == {"zero_reduce": 88 * 4 * SHARE, "zero_publish": 88 * 4 * SHARE}
    padding = 2 * (88 - PARAMS) * 4 * SHARE
    assert report.bytes_per_replica == 2 * PSI * SHARE + padding
    mirrored = _fit_step(_compiled(mirrored_strategy(N), ADAM))
    gradient_allreduce = mirrored.select(kind="all_reduce").bytes_per_replica
    assert report.bytes_per_replica - gradient_allreduce == padding


def test_clipping_adds_the_statistics_allreduce():
    strategy = zero_strategy(N, stage=2)
    model = _compiled(strategy, lambda: tf_zero.ZeroOptimizer(keras.optimizers.Adam(
        0.01, global_clipnorm=1.0)))
    stats = _fit_step(model).select(scope="zero_statistics")
    assert [op.kind for op in stats.ops] == ["all_reduce"] * N
    assert stats.bytes_per_replica == 2 * 4 * SHARE  # the squared norm, one float32


def test_stage3_is_one_and_a_half_times_within_padding_and_replicated_weights():
    """Sharded kernels (56 and 21 weights) are gathered in the forward pass,
    again in the recomputed backward pass, and their gradients
    reduce-scattered; the biases (below persistence_threshold=16) take the
    bucket path of stage 2: 2 passes."""
    model = _zero_model(3, persistence_threshold=16)
    report = _fit_step(model)
    sharded = [v for v in model.trainable_variables if tf_zero.is_sharded(v)]
    assert [tuple(v.shape) for v in sharded] == [(8, 7), (7, 3)]
    padded_sharded = (56 + 24) * 4  # shards of 14 and 6
    padded_replicated = 12 * 4  # the biases' bucket: 10 elements padded to 12
    assert report.by_scope == {"zero_gather": 2 * padded_sharded * SHARE,
                               "zero_gather_grad": padded_sharded * SHARE,
                               "zero_reduce": padded_replicated * SHARE,
                               "zero_publish": padded_replicated * SHARE}
    gathered = sorted(op.elements for op in report.select(scope="zero_gather").ops
                      if op.device.endswith("CPU:0"))
    assert gathered == [6, 6, 14, 14]  # each sharded kernel twice
    total = report.bytes_per_replica
    assert total == (3 * padded_sharded + 2 * padded_replicated) * SHARE == 792
    mirrored_gradients = 2 * PSI * SHARE
    assert total / mirrored_gradients == pytest.approx(1.517, abs=1e-3)
    psi_sharded, psi_replicated = (56 + 21) * 4, 10 * 4
    padding = 3 * (padded_sharded - psi_sharded) + 2 * (padded_replicated - psi_replicated)
    assert total == 1.5 * mirrored_gradients - psi_replicated * SHARE + padding * SHARE


def test_float16_reduce_dtype_halves_the_reduce_scatter():
    report = _fit_step(_zero_model(2, reduce_dtype="float16"))
    reduce = report.select(scope="zero_reduce")
    assert {op.dtype for op in reduce.ops} == {"float16"}
    assert reduce.bytes_per_replica == 88 * 2 * SHARE
    assert report.select(scope="zero_publish").bytes_per_replica == 88 * 4 * SHARE


@pytest.mark.parametrize("stage, every_step", [(1, 0.0), (2, 88 * 4 * SHARE)])
def test_accumulation_window_end_is_a_branch(stage, every_step):
    """k = 2: stage 1 communicates only at the window's end; stage 2
    reduce-scatters every micro-step and publishes at the window's end."""
    report = _fit_step(_zero_model(stage, accumulation_steps=2))
    assert report.bytes_per_replica == 2 * 88 * 4 * SHARE
    assert report.least_bytes_per_replica == every_step
    assert set(report.by_scope) == {"zero_reduce", "zero_publish"}
    (branch,) = report.by_branch
    assert branch.endswith("cond:then")


# ---- mixed precision ---------------------------------------------------------

# conftest.mlp(hidden=8, outputs=4): 64 + 8 + 32 + 4 weights, each a multiple of
# N, so neither one bucket nor a bucket per weight pads anything.
EVEN = 108


def _even_step(stage, policy, **strategy_kwargs):
    """(model, traffic) of the even MLP under `policy`, every weight at least
    persistence_threshold=0 large (a working copy, or sharded at stage 3)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        with zero_strategy(N, stage=stage, persistence_threshold=0, **strategy_kwargs).scope():
            model = mlp(hidden=8, outputs=4)
            model.compile(optimizer=tf_zero.ZeroOptimizer(ADAM()), loss="mse")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x, y = regression_data(outputs=4)
    return model, tf_zero.collective_traffic(model, x, y, batch_size=16)


def test_mixed_bfloat16_stage2_publishes_half_the_float32_bytes():
    """Stage 2 under mixed_bfloat16 publishes the 16-bit working copies: 2
    bytes per parameter (bfloat16 moving as float16 bits on CPU), half of
    float32 weights' publish, under the float32 policy or with
    param_dtype="float32". Keras' gradients stay float32: the reduce-scatter
    moves as many bytes as before."""
    model, mixed = _even_step(2, "mixed_bfloat16")
    assert all(tf_zero.has_working_copy(v) for v in model.trainable_variables)
    _, plain = _even_step(2, "float32")
    _, float32_weights = _even_step(2, "mixed_bfloat16", param_dtype="float32")
    publish = {name: report.select(scope="zero_publish")
               for name, report in (("mixed", mixed), ("plain", plain),
                                    ("float32_weights", float32_weights))}
    assert publish["plain"].bytes_per_replica == EVEN * 4 * SHARE
    assert publish["float32_weights"].bytes_per_replica == EVEN * 4 * SHARE
    assert publish["mixed"].bytes_per_replica == publish["plain"].bytes_per_replica / 2
    assert {op.dtype for op in publish["mixed"].ops} == {"float16"}
    for report in (mixed, plain, float32_weights):
        assert report.select(scope="zero_reduce").bytes_per_replica == EVEN * 4 * SHARE
        assert set(report.by_scope) == {"zero_reduce", "zero_publish"}


def test_mixed_bfloat16_stage3_gathers_half_the_float32_bytes():
    """Stage 3 under mixed_bfloat16 gathers every weight in 2 bytes, in the
    forward and the recomputed backward pass; its float32 gradient is
    reduce-scattered as under the float32 policy."""
    _, mixed = _even_step(3, "mixed_bfloat16")
    _, plain = _even_step(3, "float32")
    assert plain.select(scope="zero_gather").bytes_per_replica == 2 * EVEN * 4 * SHARE
    assert mixed.select(scope="zero_gather").bytes_per_replica == 2 * EVEN * 2 * SHARE
    assert {op.dtype for op in mixed.select(scope="zero_gather").ops} == {"float16"}
    for report in (mixed, plain):
        assert report.select(scope="zero_gather_grad").bytes_per_replica == EVEN * 4 * SHARE


def test_hybrid_sharding_sends_only_the_shard_allreduce_across_workers():
    """4 replicas read as 2 workers x 2, shard groups of 2 (one per worker):
    the reduce-scatter and the publish stay inside the worker, the all-reduce
    of each half-size shard crosses: 2 (Psi/K) (W-1)/W, half of what full
    sharding sends across; the total is full sharding's, 2 Psi (N-1)/N."""
    psi = EVEN * 4

    def step(**kwargs):
        with zero_strategy(N, stage=2, persistence_threshold=0, **kwargs).scope():
            model = mlp(hidden=8, outputs=4)
            model.compile(optimizer=tf_zero.ZeroOptimizer(ADAM()), loss="mse")
        x, y = regression_data(outputs=4)
        return tf_zero.collective_traffic(model, x, y, batch_size=16, workers=2)

    hybrid, full = step(shard_group_size=2), step()
    assert hybrid.bytes_per_replica == full.bytes_per_replica == 2 * psi * SHARE
    assert hybrid.across_bytes_per_replica == 2 * (psi / 2) * (1 / 2)
    assert full.across_bytes_per_replica == 2 * psi * 2 / N
    across = {(op.scope, op.kind) for op in hybrid.ops if op.across_bytes}
    assert across == {("zero_reduce", "all_reduce")}
