"""repkern.capture: hooks, layer selection, hidden-state extraction, pooling with padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import repkern


@dataclasses.dataclass
class Output:
    last_hidden_state: torch.Tensor
    extra: int = 0


class Block(nn.Module):
    """Returns (hidden, attention-like extra) like a transformer layer."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return (torch.tanh(self.lin(h)), h.sum())


class TinyModel(nn.Module):
    def __init__(self, vocab=20, d=6, layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)[0]
        return Output(self.head(h))


class PositionModel(nn.Module):
    """Hidden state = position index in every feature: pooling is hand-checkable."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x):
        b, s = x.shape
        pos = torch.arange(s, dtype=torch.float32).expand(b, s)
        return self.inner(pos[..., None].repeat(1, 1, 3) + 100 * torch.arange(b)[:, None, None])


def test_layer_selection_by_name_glob_and_module():
    model = TinyModel()
    assert [n for n, _ in repkern.capture(model, "layers.*").layers] == ["layers.0", "layers.1", "layers.2"]
    assert repkern.capture(model, "layers.**.lin").names == ["layers.0.lin", "layers.1.lin", "layers.2.lin"]
    assert repkern.capture(model, "layers.?").names == ["layers.0", "layers.1", "layers.2"]
    cap = repkern.capture(model, [model.head, "layers.1", "embed"])
    assert cap.names == ["embed", "layers.1", "head"]  # the model's order
    with pytest.raises(ValueError, match=r"layers: 'decoder\.\*' matches no module name"):
        repkern.capture(model, "decoder.*")
    with pytest.raises(ValueError, match="not a submodule"):
        repkern.capture(model, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pool: expected one of"):
        repkern.capture(model, "head", pool="max")


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_exception():
    model = TinyModel()
    ids = torch.randint(0, 20, (2, 5))
    with repkern.capture(model, "layers.*", pool="mean") as cap:
        assert _hook_count(model) == 3
        acts = cap.run(ids)
    assert _hook_count(model) == 0
    assert set(acts) == {"layers.0", "layers.1", "layers.2"} and acts["layers.2"].shape == (2, 6)
    with pytest.raises(RuntimeError, match="boom"):
        with repkern.capture(model, "layers.*"):
            assert _hook_count(model) == 3
            raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_tuple_and_model_output_give_the_hidden_state():
    model = TinyModel()
    ids = torch.randint(0, 20, (3, 4))
    with repkern.capture(model, ["layers.0", "layers.2"], pool="all") as cap:
        acts = cap.run(ids)
        out = model(ids).last_hidden_state
    h = model.embed(ids)
    expected0 = model.layers[0](h)[0]
    torch.testing.assert_close(acts["layers.0"], expected0.reshape(-1, 6))
    assert not acts["layers.0"].requires_grad  # detached by default
    assert out.shape == (3, 4, 2)


def test_pooling_with_left_and_right_padding():
    model = PositionModel()
    x = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding: last token at 2
            [0, 0, 1, 1, 1],  # left padding: last token at 4
            [1, 1, 1, 1, 1],
        ]
    )
    results = {}
    for pool in ("all", "last", "mean"):
        with repkern.capture(model, "inner", pool=pool) as cap:
            model(x)
            results[pool] = cap.collect(mask)["inner"]
    offset = torch.tensor([0.0, 100.0, 200.0])[:, None]
    torch.testing.assert_close(results["last"], (torch.tensor([2.0, 4.0, 4.0])[:, None] + offset).expand(3, 3))
    torch.testing.assert_close(results["mean"], (torch.tensor([1.0, 3.0, 2.0])[:, None] + offset).expand(3, 3))
    expected_all = torch.tensor([0, 1, 2, 102, 103, 104, 200, 201, 202, 203, 204], dtype=torch.float32)
    torch.testing.assert_close(results["all"], expected_all[:, None].expand(11, 3))


def test_mask_errors_and_missing_forward():
    model = PositionModel()
    with repkern.capture(model, "inner") as cap:
        with pytest.raises(RuntimeError, match="no output recorded"):
            cap.collect()
        model(torch.zeros(2, 4, dtype=torch.long))
        with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 4\)"):
            cap.collect(torch.ones(2, 5))


def test_detach_false_keeps_the_graph_for_losses():
    model = TinyModel()
    ids = torch.randint(0, 20, (2, 5))
    with repkern.capture(model, "layers.2", pool="mean", detach=False) as cap:
        acts = cap.run(ids)
    acts["layers.2"].sum().backward()
    assert model.layers[0].lin.weight.grad is not None


# ---- site="input", stop_early, modules run twice, TransformerLens hook points --------------------------


class HookPoint(nn.Module):
    """TransformerLens's HookPoint: an identity module whose output is the activation cached under its name."""

    def forward(self, x):
        return x


class HookedBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.mlp = nn.Linear(d, d)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid_pre):
        resid = self.hook_resid_pre(resid_pre)
        return self.hook_resid_post(resid + self.hook_mlp_out(torch.tanh(self.mlp(resid))))


class TinyHookedTransformer(nn.Module):
    """The module tree of a HookedTransformer: embed, hook_embed, blocks.<i>.hook_*, unembed."""

    def __init__(self, vocab=20, d=6, layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(HookedBlock(d) for _ in range(layers))
        self.unembed = nn.Linear(d, vocab)

    def residual_stream(self, tokens):
        """The input of every block and the output of the last: computed without hooks (the oracle)."""
        resid = [self.embed(tokens)]
        for block in self.blocks:
            resid.append(resid[-1] + torch.tanh(block.mlp(resid[-1])))
        return resid

    def forward(self, input, attention_mask=None):
        resid = self.hook_embed(self.embed(input))
        for block in self.blocks:
            resid = block(resid)
        return self.unembed(resid)


def test_transformerlens_hook_points_by_name_and_block_inputs():
    model = TinyHookedTransformer()
    tokens = torch.randint(0, 20, (2, 5))
    resid = model.residual_stream(tokens)
    with repkern.capture(model, "blocks.*.hook_resid_post", pool="all") as cap:
        post = cap.run(tokens)
    assert list(post) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    for i, name in enumerate(post):
        torch.testing.assert_close(post[name], resid[i + 1].reshape(-1, 6))
    with repkern.capture(model, ["blocks.*", "blocks.1.mlp"], pool="all", site="input") as cap:
        pre = cap.run(tokens)
    for i in range(3):  # a block's input is the residual stream before it: hook_resid_pre, and the last block's output
        torch.testing.assert_close(pre[f"blocks.{i}"], resid[i].reshape(-1, 6))
    torch.testing.assert_close(pre["blocks.1.mlp"], resid[1].reshape(-1, 6))


def test_site_input_reads_a_keyword_argument():
    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x):
            return self.inner(input=2 * x)

    x = torch.randn(3, 4)
    with repkern.capture(ByKeyword(), "inner", site="input") as cap:
        torch.testing.assert_close(cap.run(x)["inner"], 2 * x)
    with pytest.raises(ValueError, match="site: expected one of"):
        repkern.capture(ByKeyword(), "inner", site="resid")


class Forbidden(nn.Module):
    """Fails when run: marks the part of a model that an early stop must skip."""

    def forward(self, h):
        raise AssertionError("ran past the last hooked module")


def test_stop_early_skips_the_rest_of_the_forward_pass():
    model = TinyHookedTransformer()
    tokens = torch.randint(0, 20, (2, 5))
    with repkern.capture(model, "blocks.0.hook_resid_post", pool="mean") as cap:
        want = cap.run(tokens)
    block_1_input = model.residual_stream(tokens)[1]
    model.blocks[1] = Forbidden()
    with repkern.capture(model, "blocks.0.hook_resid_post", pool="mean", stop_early=True) as cap:
        got = cap.run(tokens)
        with pytest.raises(AssertionError, match="ran past"):  # a forward pass called directly is not stopped
            model(tokens)
        cap.collect()
        again = cap.run(tokens)  # usable after a failed pass
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)
    with repkern.capture(model, "blocks.1", site="input", stop_early=True) as cap:  # the hooked module itself is skipped
        torch.testing.assert_close(cap.run(tokens)["blocks.1"], block_1_input.reshape(-1, 6))
    with pytest.raises(TypeError, match="stop_early: expected a bool"):
        repkern.capture(model, "embed", stop_early=1)


def test_a_module_run_twice_in_one_pass_is_an_error_naming_it():
    class Shared(nn.Module):  # ALBERT-style: one layer applied twice
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.layer(self.layer(x)))

    model = Shared()
    for site in ("output", "input"):
        with repkern.capture(model, ["layer", "head"], site=site, stop_early=True) as cap:
            with pytest.raises(RuntimeError, match="capture: module 'layer' ran twice in one forward pass"):
                cap.run(torch.randn(2, 4))
    with repkern.capture(model, "head") as cap:
        model(torch.randn(2, 4))
        with pytest.raises(RuntimeError, match="'head' ran twice.*without collect"):
            model(torch.randn(2, 4))
