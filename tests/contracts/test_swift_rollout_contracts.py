"""Upstream contracts of the rollout backends (stage2.md §16; spec tests 54-56): ms-swift 4.6's installed protocol
classes and server routes, ``FlattenedTensorBucket``'s byte layout, the chunk plan, and the vLLM / NCCL APIs the GPU
paths call (skipped when vLLM or a GPU is absent, never faked)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch

from adapters.swift_rollout.client import (
    infer_body,
    infer_request_json,
    metadata_json,
    parse_infer_item,
    request_config_json,
    weight_buckets,
)
from adapters.vllm.colocate import ColocateSettings, colocate_engine_kwargs
from domain.errors import ConfigError
from domain.rollout_plan import Chunk, chunk_plan, request_seed, seed_base
from ports.rollout import RolloutDecoding, RolloutRequest

SPEC_DECODING = RolloutDecoding(max_new_tokens=512)


def _swift_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not installed"
    return Path(spec.origin).read_text(encoding="utf-8")


def test_pinned_ms_swift_version() -> None:
    from importlib.metadata import version

    assert version("ms-swift").startswith("4.6"), "stage2.md §16.3.2 pins ms-swift 4.6: re-check the protocol"


# ---- /infer/ payload against ms-swift's classes ----------------------------------------------------------------


def test_request_config_carries_every_field_of_mswift_request_config() -> None:
    from swift.infer_engine.protocol import RequestConfig

    config = request_config_json(SPEC_DECODING, 3000051)
    assert list(config) == [f.name for f in dataclasses.fields(RequestConfig)]
    expected = {"n": 1, "max_tokens": 512, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
                "num_beams": 1, "stop": ["<|im_end|>"], "seed": 3000051, "stream": False, "logprobs": False,
                "return_details": True}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert dataclasses.asdict(RequestConfig(**config)) == config  # the server side rebuilds it unchanged


def test_infer_request_is_mswift_rollout_infer_request() -> None:
    from swift.infer_engine.protocol import RolloutInferRequest

    request = RolloutRequest(
        0, "SYS", "Detect every object in this image.", ("/abs/img.jpg",), SPEC_DECODING, 1
    )
    payload = infer_request_json(request)
    assert set(payload) == {"messages", "images"} <= {f.name for f in dataclasses.fields(RolloutInferRequest)}
    rebuilt = RolloutInferRequest(**payload)
    assert rebuilt.images == ["/abs/img.jpg"]
    assert rebuilt.messages == [{"role": "system", "content": "SYS"},
                                {"role": "user", "content": "<image>Detect every object in this image."}]  # fmt: skip


def test_body_keys_cover_the_mswift_client_and_server_signatures() -> None:
    body = infer_body([RolloutRequest(0, "s", "u", (), SPEC_DECODING, 5)], 5)
    client_src = _swift_source("swift.rlhf_trainers.vllm_client")
    sent_by_mswift = set(
        re.findall(r"'(\w+)': (?:chunk|request_config|metrics|use_tqdm|adapter_request),", client_src)
    )
    assert sent_by_mswift == {"infer_requests", "request_config", "metrics", "use_tqdm", "adapter_request"}
    assert sent_by_mswift | {"template"} == set(body)
    server_src = _swift_source("swift.pipelines.infer.rollout")
    signature = re.search(r"async def infer\(\s*self,(.*?)\):", server_src, re.DOTALL)
    assert signature is not None
    assert {"infer_requests", "request_config", "use_tqdm"} <= set(re.findall(r"(\w+):", signature.group(1)))


def test_reply_forms_validate_with_mswift_classes() -> None:
    from swift.infer_engine.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
        RolloutOutput,
        UsageInfo,
    )

    response = ChatCompletionResponse(
        model="m", usage=UsageInfo(3, 2, 5), prompt_token_ids=[1, 2, 3],
        choices=[ChatCompletionResponseChoice(0, ChatMessage("assistant", "x"), "stop", token_ids=[7, 8])],
    )  # fmt: skip
    wrapped = RolloutOutput(response=response, rollout_infos={"repeat_terminate_triggered": 1}).model_dump(
        mode="json"
    )
    parsed = parse_infer_item(wrapped, where="w", n=1, repeat_terminate=True)
    assert parsed.prompt_ids == (1, 2, 3) and parsed.samples == (((7, 8), "stop", True),)
    bare = parse_infer_item(dataclasses.asdict(response), where="w", n=1, repeat_terminate=False)
    assert bare.samples == (((7, 8), "stop", False),)
    fields = {f.name for f in dataclasses.fields(ChatCompletionResponse)}
    assert {"prompt_token_ids", "choices"} <= fields
    assert {"token_ids", "finish_reason"} <= {
        f.name for f in dataclasses.fields(ChatCompletionResponseChoice)
    }
    assert {"response", "rollout_infos"} <= set(RolloutOutput.model_fields)


# ---- server routes and auth of ms-swift 4.6 ----------------------------------------------------------------------


def test_server_routes_methods_and_auth_guard() -> None:
    source = _swift_source("swift.pipelines.infer.rollout")
    routes = {path: method for method, path in re.findall(r"self\.app\.(get|post)\('([^']+)'", source)}
    expected = {
        "/health/": "get", "/get_world_size/": "get", "/get_engine_type/": "post", "/infer/": "post",
        "/init_communicator/": "post", "/update_flattened_params/": "post", "/process_weights_after_loading/": "post",
        "/update_adapter_flattened_param/": "post", "/reset_prefix_cache/": "post", "/reset_encoder_cache/": "post",
        "/reset_mm_cache/": "post", "/close_communicator/": "post",
    }  # fmt: skip
    assert {p: routes.get(p) for p in expected} == expected
    guarded = set(re.findall(r"self\.app\.(?:get|post)\('([^']+)'[^)]*dependencies=guard\)", source))
    assert guarded == set(expected) - {"/health/"} | {
        "/get_model_state_keys/",
        "/update_named_param/",
        "/update_adapter_param/",
    }
    assert "authorization.startswith('Bearer ')" in source and "authorization[7:]" in source
    assert "'engine_type': engine_type" in source and "'enable_lora': enable_lora" in source
    assert (
        "vllm_tensor_parallel_size * self.args.vllm_data_parallel_size + 1" in source
    )  # server's own group size


# ---- FlattenedTensorBucket byte layout -------------------------------------------------------------------------------


def test_bucket_layout_is_bytes() -> None:
    """numel, start_idx and end_idx count bytes of one uint8 buffer; a 2x3 bf16 tensor has numel 12."""
    from swift.rlhf_trainers.utils import FlattenedTensorBucket, FlattenedTensorMetadata

    a = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
    [bucket] = weight_buckets([("a", a)], 512)
    assert metadata_json(bucket) == [
        {"name": "a", "shape": (2, 3), "dtype": "torch.bfloat16", "start_idx": 0, "end_idx": 12, "numel": 12}
    ]
    flat = bucket.get_flattened_tensor()
    assert flat.dtype == torch.uint8 and flat.numel() == 12
    assert torch.equal(flat, a.flatten().view(torch.uint8))
    rebuilt = FlattenedTensorBucket(
        flattened_tensor=flat, metadata=[FlattenedTensorMetadata(**m) for m in metadata_json(bucket)]
    )
    assert torch.equal(rebuilt.reconstruct_tensors()["a"], a)


def test_mixed_dtype_buckets_are_aligned_for_the_servers_reconstruction() -> None:
    """The server rebuilds tensors with ``byte_slice.view(dtype)``, which needs each offset divisible by the element
    size: in ms-swift's own order a bf16 tensor of odd numel before an int64 one cannot be rebuilt; ours can."""
    from swift.rlhf_trainers.utils import FlattenedTensorBucket, FlattenedTensorMetadata

    a = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)  # 12 bytes
    b = torch.tensor([1, 2, 3], dtype=torch.int64)
    c = torch.tensor([0.5, 1.5], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="divisible"):
        FlattenedTensorBucket(named_tensors=[("a", a), ("b", b)]).reconstruct_tensors()
    [bucket] = weight_buckets([("a", a), ("b", b), ("c", c)], 512)
    metas = metadata_json(bucket)
    assert [(m["name"], m["start_idx"], m["end_idx"], m["numel"]) for m in metas] == [
        ("b", 0, 24, 24), ("c", 24, 32, 8), ("a", 32, 44, 12)
    ]  # fmt: skip
    rebuilt = FlattenedTensorBucket(
        flattened_tensor=bucket.get_flattened_tensor(), metadata=[FlattenedTensorMetadata(**m) for m in metas]
    ).reconstruct_tensors()
    assert all(torch.equal(rebuilt[k], v) for k, v in {"a": a, "b": b, "c": c}.items())


def test_buckets_follow_mswift_grouping() -> None:
    from swift.rlhf_trainers.utils import _create_parameter_buckets

    named = [
        (f"t{i}", torch.zeros(size, dtype=torch.uint8))
        for i, size in enumerate([600_000, 600_000, 2_000_000, 10])
    ]
    ours = [[m["name"] for m in metadata_json(b)] for b in weight_buckets(named, 1)]
    theirs = [[name for name, _ in group] for group in _create_parameter_buckets(named, bucket_size_mb=1)]
    assert ours == theirs == [["t0"], ["t1"], ["t2"], ["t3"]]
    assert [[m["name"] for m in metadata_json(b)] for b in weight_buckets(named, 3)] == [
        ["t0", "t1"],
        ["t2", "t3"],
    ]


# ---- chunk plan and seeds (§2.3, §16.3.4; spec tests 54, 56) ------------------------------------------------------


def test_chunk_plan_spec_examples() -> None:
    assert chunk_plan(0, 2) == ()
    assert [(c.start, c.stop) for c in chunk_plan(5, 2)] == [(0, 3), (3, 5)]
    assert [(c.start, c.stop) for c in chunk_plan(5, 3)] == [(0, 2), (2, 4), (4, 5)]
    assert [(c.server, c.start, c.stop) for c in chunk_plan(4, 3)] == [(0, 0, 2), (1, 2, 4)]
    assert seed_base(42, 3) == 3000051
    assert [request_seed(seed_base(42, 3), c.start) for c in chunk_plan(5, 2)] == [3000051, 3000054]
    assert request_seed(0x7FFFFFFF, 1) == 0
    assert Chunk(0, 2, 5).halves() == (Chunk(0, 2, 3), Chunk(0, 3, 5))


@pytest.mark.parametrize("servers", [1, 2, 3, 4])
def test_chunk_plan_covers_in_order(servers: int) -> None:
    for n in range(23):
        plan = chunk_plan(n, servers)
        covered = [i for c in plan for i in range(c.start, c.stop)]
        assert covered == list(range(n))
        assert [c.server for c in plan] == sorted({c.server for c in plan}) and len(plan) <= servers
        assert all(c.size == -(-n // servers) for c in plan[:-1])


# ---- colocate engine kwargs (pure) and the GPU paths (skipped without vLLM / GPU) --------------------------------


def test_colocate_engine_kwargs() -> None:
    base = ColocateSettings(model_path="/m", dtype="bfloat16", max_model_len=4096)
    kwargs = colocate_engine_kwargs(base)
    assert (kwargs["load_format"], kwargs["distributed_executor_backend"], kwargs["disable_custom_all_reduce"]) == (
        "dummy", "mp", True
    )  # fmt: skip
    lora = colocate_engine_kwargs(
        attrs_evolve(base, enable_lora=True, world_size=4, tensor_parallel_size=2, rank=3)
    )
    assert (lora["load_format"], lora["distributed_executor_backend"], lora["seed"]) == (
        "auto",
        "external_launcher",
        1,
    )
    with pytest.raises(ConfigError) as caught:
        colocate_engine_kwargs(attrs_evolve(base, max_model_len=None, world_size=3, tensor_parallel_size=2,
                                            engine_kwargs={"foo": 1, "kv_cache_dtype": "fp8"}, repeat_terminate=True))  # fmt: skip
    text = str(caught.value)
    assert "max_model_len" in text and "does not divide" in text and "engine_kwargs.foo" in text
    assert "kv_cache_dtype" not in text.split("allowed")[0] and "repeat_terminate" in text


def attrs_evolve(settings: ColocateSettings, **changes: object) -> ColocateSettings:
    import attrs

    return attrs.evolve(settings, **changes)


def test_grpo_engine_accepts_our_kwargs() -> None:
    pytest.importorskip("vllm")
    from swift.infer_engine import GRPOVllmEngine

    params = inspect.signature(GRPOVllmEngine.__init__).parameters
    kwargs = colocate_engine_kwargs(ColocateSettings(model_path="/m", dtype="bfloat16", max_model_len=4096))
    assert set(kwargs) | {"torch_dtype"} <= set(params)
    assert {"infer_requests", "request_config", "use_tqdm"} <= set(
        inspect.signature(GRPOVllmEngine.infer).parameters
    )
    assert isinstance(inspect.getattr_static(GRPOVllmEngine, "inner_model"), property)


def test_nccl_apis_the_broadcaster_calls() -> None:
    pytest.importorskip("vllm")
    from swift.rlhf_trainers.utils import TensorLoRARequest, broadcast_tensor_for_vllm_weight_sync
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    assert {"host", "port", "rank", "world_size"} <= set(
        inspect.signature(StatelessProcessGroup.create).parameters
    )
    assert {"group", "device"} <= set(inspect.signature(PyNcclCommunicator.__init__).parameters)
    assert {"communicator", "tensor", "src"} <= set(
        inspect.signature(broadcast_tensor_for_vllm_weight_sync).parameters
    )
    assert TensorLoRARequest is not None


@pytest.mark.gpu
def test_nccl_broadcaster_joins_a_group() -> None:
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from adapters.swift_rollout.nccl import nccl_available

    assert nccl_available()
