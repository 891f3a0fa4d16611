"""Shared fixtures: the tiny model folders (built once a session from the builders in tests/helpers.py), a temporary
runs root (`runs`), the shipped base and adapters on it."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import (build_tiny_flux_folder, build_tiny_owl_folder, build_tiny_sd3_folder, build_tiny_sd_folder,
                     build_tiny_sdxl_folder)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """A tiny SD-architecture folder on disk, built once per test session."""
    return build_tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory) -> Path:
    """A tiny SDXL-architecture folder on disk, built once per test session."""
    return build_tiny_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory) -> Path:
    """A tiny SD3-architecture folder (with its T5) on disk, built once per test session."""
    return build_tiny_sd3_folder(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sd3_no_t5_folder(tmp_path_factory) -> Path:
    """A tiny SD3-architecture folder without a T5 (no text_encoder_3/), built once per test session."""
    return build_tiny_sd3_folder(tmp_path_factory.mktemp("tiny-sd3-no-t5"), t5=False)


@pytest.fixture(scope="session")
def tiny_flux_folder(tmp_path_factory) -> Path:
    """A tiny FLUX.1-architecture folder (guidance-distilled, as FLUX.1-dev) on disk, built once per test session."""
    return build_tiny_flux_folder(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_flux_plain_folder(tmp_path_factory) -> Path:
    """A tiny FLUX.1-architecture folder without the guidance embedding (as FLUX.1-schnell), built once per session."""
    return build_tiny_flux_folder(tmp_path_factory.mktemp("tiny-flux-plain"), distilled=False)


@pytest.fixture(scope="session")
def tiny_owl_folder(tmp_path_factory) -> Path:
    """A tiny random-weight OWL-ViT folder on disk, built once per test session."""
    return build_tiny_owl_folder(tmp_path_factory.mktemp("tiny-owlvit"))


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A temporary runs root: run names resolve there. (A test file whose tmp_path holds more than runs has its own.)"""
    monkeypatch.setenv("ADAPTERLIB_RUNS", str(tmp_path))
    return tmp_path


# --- the shipped base and adapters on it, shared by the adapter, checks, evaluation and slider tests

@pytest.fixture(scope="session")
def base():
    from adapterlib.model.base import load_base
    return load_base("shapes-tiny")


@pytest.fixture(scope="session")
def records():
    from adapterlib import shapes
    return shapes.heldout_records(3)


@pytest.fixture
def fresh_adapter(base):
    """A just-built adapter (all gates exactly zero), detached after the test."""
    from adapterlib.model.adapter import build_adapter
    adapter = build_adapter(base)
    yield adapter
    adapter.detach()


@pytest.fixture(scope="module")
def open_adapter(base):
    """An untrained adapter with every gate at 1.0, so that it visibly changes the images."""
    import torch

    from adapterlib.model.adapter import build_adapter
    torch.manual_seed(0)
    adapter = build_adapter(base)
    with torch.no_grad():
        for gate in adapter.gate_parameters().values():
            gate.fill_(1.0)
    yield adapter
    adapter.detach()
