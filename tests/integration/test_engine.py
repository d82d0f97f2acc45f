"""The engine building blocks with real parts: the tiny model made on the spot,
and one real vLLM CPU engine supervised on a loopback address."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat

import pytest
from openai import OpenAI

from controller import processes
from controller import testing as tk
from controller.engines.engine import EngineFailed, EngineProcess, EngineSpec
from controller.engines.tiny_model import SERVED_NAME, ensure_tiny_model

ENGINE_READY_TIMEOUT = 300
ENGINE_IP = "127.0.0.3"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


def test_tiny_model_is_made_once_with_a_head_dim_vllm_accepts(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    config = json.loads((tiny_model / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (128, 2, 2)
    assert config["head_dim"] == 64
    assert stat.S_IMODE(os.stat(tiny_model).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tiny_model.parent).st_mode) == 0o700
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("the cluster serves a request")["input_ids"]
    assert tok.decode(ids) == "the cluster serves a request"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|user|>hi\n<|assistant|>"
    before = (tiny_model / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tiny_model.parent) == tiny_model
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == before  # reused, not remade


async def test_engine_serves_real_completions_and_reports_its_death(tiny_model):
    spec = EngineSpec(model=str(tiny_model), served_name=SERVED_NAME, host=ENGINE_IP, port=tk.free_port())
    engine = EngineProcess(spec, replica_id="replica-test")
    await engine.start()
    try:
        await engine.wait_ready(ENGINE_READY_TIMEOUT)
        client = OpenAI(base_url=spec.url + "/v1", api_key="unused", timeout=60)
        done = await asyncio.to_thread(client.completions.create, model=SERVED_NAME,
                                       prompt="the head", max_tokens=4, temperature=0)
        assert done.usage.completion_tokens == 4 and done.choices[0].text
        chat = await asyncio.to_thread(client.chat.completions.create, model=SERVED_NAME,
                                       messages=[{"role": "user", "content": "hello"}], max_tokens=3,
                                       extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 3
        assert await engine.probe() is None
        assert engine.recent  # the engine output was captured
        # A dead engine says so, with its exit code.
        victims = processes.tree({engine.pid}, {engine.pid})
        assert len(victims) >= 2  # the API server and its engine core
        processes.kill_now(victims)
        await asyncio.wait_for(engine.proc.wait(), 10)
        assert engine.exit_reason().startswith(f"engine exited with code {-signal.SIGKILL}")
        assert (await engine.probe(timeout=3)).startswith("generation probe failed")
    finally:
        left = await engine.stop()
    assert not left and not processes.tree({engine.pid}, {engine.pid})


async def test_engine_that_cannot_load_its_model_fails_with_the_reason(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    spec = EngineSpec(model=str(broken), served_name="broken", host=ENGINE_IP, port=tk.free_port())
    engine = EngineProcess(spec, replica_id="replica-broken")
    await engine.start()
    try:
        with pytest.raises(EngineFailed) as err:
            await engine.wait_ready(ENGINE_READY_TIMEOUT)
        assert str(err.value).startswith("engine exited with code 1: ")
        assert engine.last_error and engine.last_error in str(err.value)
    finally:
        left = await engine.stop()
    assert not left


async def test_engine_port_already_taken_is_refused_before_starting(tiny_model):
    import socket

    with socket.socket() as s:
        s.bind((ENGINE_IP, 0))
        s.listen()
        spec = EngineSpec(model=str(tiny_model), served_name=SERVED_NAME, host=ENGINE_IP, port=s.getsockname()[1])
        engine = EngineProcess(spec, replica_id="replica-port")
        with pytest.raises(EngineFailed, match="is already taken"):
            await engine.start()
        assert engine.proc is None
