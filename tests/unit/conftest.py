"""Unit tests are pure: a guard fails any that starts a subprocess or Ray."""

import asyncio
import subprocess

import pytest
import ray


@pytest.fixture(autouse=True)
def no_processes_no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a unit test tried to start a process or Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
