"""Serialized engine programs (jaxinfer.programs): the same tokens as tracing, no tracing of the
model on a warm start, and a damaged entry rebuilt, never run."""

import dataclasses

import jax
import pytest
from test_startup import tiny_model_file

import jaxinfer
import models
from jaxinfer import generate, programs
from jaxinfer.generate import Request
from jaxinfer.sampling import Sampling

PROMPTS = [[1, 2, 3, 4, 5], [7, 8]]


@pytest.fixture
def tiny(tmp_path_factory):
    return jaxinfer.load(tiny_model_file(tmp_path_factory.mktemp("tiny")), progress=False)


@pytest.fixture(autouse=True)
def programs_off():
    yield
    programs.enable(None)


def run(model, sampling=None) -> list[list[int]]:
    req = Request(prompts=PROMPTS, sampling=[sampling or Sampling()], max_new_tokens=6,
                  stop_token_ids=())
    return [c.token_ids for c in generate.generate_ids(model, req, chunk=3)]


def fresh_process(directory, monkeypatch) -> list:
    """What a new process sees: nothing compiled or memoized; count the model's traces."""
    jax.clear_caches()
    programs.enable(directory)
    traced = []
    forward = models.forward
    monkeypatch.setattr(models, "forward", lambda *a, **k: traced.append(1) or forward(*a, **k))
    return traced


def test_programs_give_the_tokens_of_tracing_and_skip_it_when_warm(tiny, tmp_path, monkeypatch):
    samplings = [None, Sampling(temperature=0.9, top_p=0.9, seed=3)]  # greedy, seeded
    want = [run(tiny, s) for s in samplings]
    traced = fresh_process(tmp_path, monkeypatch)
    assert [run(tiny, s) for s in samplings] == want  # cold: exported, written, run from it
    assert traced and len(list(tmp_path.glob("*.jaxprog"))) >= 2
    traced = fresh_process(tmp_path, monkeypatch)
    assert [run(tiny, s) for s in samplings] == want  # warm: from the entries
    assert traced == []  # the model was never traced


def test_damaged_program_is_rebuilt_never_run(tiny, tmp_path, monkeypatch):
    """Each entry damaged one way (truncated, one payload bit flipped, emptied)."""
    want = run(tiny)
    fresh_process(tmp_path, monkeypatch)
    run(tiny)
    entries = sorted(tmp_path.glob("*.jaxprog"))
    assert len(entries) >= 2
    for i, p in enumerate(entries):
        blob = p.read_bytes()
        blob = [blob[: len(blob) // 2], blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:],
                b""][i % 3]
        p.write_bytes(blob)
    traced = fresh_process(tmp_path, monkeypatch)
    assert run(tiny) == want
    assert traced  # rebuilt by tracing again ...
    for p in entries:  # ... and written whole again
        assert programs._read(p) is not None


def test_other_config_gets_its_own_entry(tiny, tmp_path, monkeypatch):
    fresh_process(tmp_path, monkeypatch)
    run(tiny)
    first = set(tmp_path.glob("*.jaxprog"))
    config = dataclasses.replace(tiny.config, norm_eps=tiny.config.norm_eps * 2)
    other = dataclasses.replace(tiny, config=config)
    run(other)
    assert set(tmp_path.glob("*.jaxprog")) > first


def test_programs_off_writes_nothing(tiny, tmp_path, monkeypatch):
    programs.enable(None)
    run(tiny)
    assert not programs.enabled() and not list(tmp_path.iterdir())


def test_unwritable_directory_only_costs_the_speed_up(tiny, tmp_path, monkeypatch, capsys):
    want = run(tiny)
    (tmp_path / "a file").write_text("")
    fresh_process(tmp_path / "a file" / "programs", monkeypatch)
    assert run(tiny) == want
    assert "cannot write the engine programs" in capsys.readouterr().err


def _inits(monkeypatch) -> list:
    """Count traces of a model's init (models._boxed_params), after forgetting every
    config's abstract params (what a new process knows)."""
    monkeypatch.setattr(models, "_ABSTRACT", {})
    traced = []
    boxed = models._boxed_params
    monkeypatch.setattr(models, "_boxed_params", lambda *a: traced.append(1) or boxed(*a))
    return traced


@pytest.mark.parametrize("config", models._declaring_configs(), ids=["llama", "moe", "gpt2"])
def test_abstract_declaration_gives_the_traced_tree(config, monkeypatch):
    """Every family's abstract params (shapes, dtypes, logical axes, tree) come back whole from
    their plain-data declaration, through JSON."""
    import json

    traced = models._abstract(config)
    declaration = json.loads(json.dumps(models.abstract_declaration(config)))
    inits = _inits(monkeypatch)
    models.declare_abstract(config, declaration)
    assert jax.tree.structure(models._abstract(config)) == jax.tree.structure(traced)
    assert jax.tree.leaves(models._abstract(config)) == jax.tree.leaves(traced)
    assert models.logical_axes(config) == jax.tree.map(
        lambda p: tuple(p.names), traced, is_leaf=lambda x: hasattr(x, "names"))
    assert inits == []


@pytest.mark.parametrize("bad", [{}, {"embed": [[4, 2], "float32", ["vocab"]]},
                                 {"embed": [[4, 2], "no dtype", ["vocab", "embed"]]},
                                 {"embed": "x"}])
def test_bad_abstract_declaration_is_refused(bad, monkeypatch):
    config = models.LlamaConfig.tiny()
    _inits(monkeypatch)
    with pytest.raises(ValueError, match="not an abstract-params declaration"):
        models.declare_abstract(config, bad)
    assert config not in models._ABSTRACT


def test_warm_load_traces_no_init_and_a_damaged_entry_is_remade(tmp_path, monkeypatch):
    """With programs on, loading keeps the model's abstract params in the programs directory:
    a second load (a fresh process's memo) traces no init; a damaged entry is deleted and
    made again, never used."""
    (tmp_path / "model").mkdir()
    path = tiny_model_file(tmp_path / "model")
    programs.enable(tmp_path / "programs")
    inits = _inits(monkeypatch)
    want = jaxinfer.load(path, progress=False)
    assert inits and len(entries := list((tmp_path / "programs").glob("*.abstract.json"))) == 1
    inits = _inits(monkeypatch)
    model = jaxinfer.load(path, progress=False)
    assert inits == []
    assert jax.tree.leaves(models.abstract_params(model.config)) == jax.tree.leaves(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), want.params))
    blob = entries[0].read_bytes()
    entries[0].write_bytes(blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:])  # one payload bit
    inits = _inits(monkeypatch)
    jaxinfer.load(path, progress=False)
    assert inits  # traced again, and the entry written whole again
    assert programs._read_entry(entries[0], lambda meta, payload: payload) is not None
