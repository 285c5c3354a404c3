import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from kvpilot.signals import GpuStats, NodeState, ReplicaState, from_json, to_json

unit = st.floats(min_value=0, max_value=1, allow_nan=False)
gpus = st.builds(
    GpuStats,
    uuid=st.text(min_size=1, max_size=20),
    index=st.integers(0, 7),
    name=st.sampled_from(["NVIDIA L4", "NVIDIA H100 80GB HBM3"]),
    hbm_used_bytes=st.integers(0, 2**40),
    hbm_total_bytes=st.integers(0, 2**40),
    util=unit,
    mem_bw_util=unit,
    sm_active=st.none() | unit,
    power_w=st.none() | st.floats(0, 1000),
    mig_instance=st.none() | st.just("1"),
)
replicas = st.builds(
    ReplicaState,
    replica_id=st.text(min_size=1, max_size=30),
    address=st.just("http://10.0.0.1:8000"),
    pool=st.text(max_size=10),
    models=st.lists(st.text(max_size=10), max_size=3).map(tuple),
    gpus=st.lists(gpus, max_size=3).map(tuple),
    waiting=st.integers(0, 1000),
    kv_usage=unit,
    ttft_s=st.none() | st.floats(0, 100),
    lora_adapters=st.lists(st.text(max_size=5), max_size=2).map(tuple),
    observed_at=st.floats(0, 2e9),
)


@given(replicas)
def test_replica_state_round_trips(r):
    assert from_json(ReplicaState, to_json(r)) == r


@given(st.lists(replicas, max_size=4), st.lists(gpus, max_size=4))
def test_node_state_round_trips(rs, gs):
    n = NodeState(node="gke-l4-1", observed_at=1.5, gpus=tuple(gs), replicas=tuple(rs))
    back = from_json(NodeState, to_json(n))
    assert back == n
    assert all(isinstance(r.gpus, tuple) for r in back.replicas)


def test_unknown_keys_from_a_newer_agent_are_ignored():
    r = ReplicaState(replica_id="ns/pod", address="http://x:1", pool="p", kv_usage=0.5)
    d = dataclasses.asdict(r) | {"new_field": 1}
    import orjson

    assert from_json(ReplicaState, orjson.dumps(d)) == r


def test_derived_fields():
    r = ReplicaState(replica_id="a", address="b", pool="p", kv_blocks_total=1000, kv_usage=0.25)
    assert r.kv_blocks_free == 750
    assert r.age(r.observed_at + 2) == 2
