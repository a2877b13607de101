"""A pure-numpy sentence-transformers BERT encoder (all-MiniLM-L6-v2 and kin).

Keel serves ``local-embed`` without torch: the whole model is six small BERT
layers, so numpy's BLAS does the work in a few milliseconds per sentence. The
directory is a sentence-transformers export: ``config.json``,
``model.safetensors``, ``tokenizer.json`` and optionally
``sentence_bert_config.json`` (max sequence length) and
``1_Pooling/config.json`` (mean or CLS pooling). Embeddings are L2-normalised,
as the model was trained to be compared by cosine / dot product.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

# Keys of one encoder layer, relative to "encoder.layer.N.".
_LAYER_KEYS = (
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
)

# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7, below float32 resolution here.
_ERF_P = np.float32(0.3275911)
_ERF_A = tuple(
    np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
)
_F = np.float32


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's "gelu": the exact x * Phi(x) (erf form), not the tanh approximation.

    Written with in-place operations on two temporaries: this runs on the
    largest activations of the model.
    """
    z = np.abs(x) * _F(0.7071067811865476)
    t = z * _ERF_P
    t += _F(1.0)
    np.reciprocal(t, out=t)
    a1, a2, a3, a4, a5 = _ERF_A
    poly = t * a5
    for a in (a4, a3, a2, a1):
        poly += a
        poly *= t
    np.square(z, out=z)
    # exp(-80) is still a normal float32; smaller values would be subnormal
    # (very slow arithmetic) for no change in the result.
    np.minimum(z, _F(80.0), out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z  # 1 - erf(|x| / sqrt 2)
    poly *= _F(-0.5)
    poly += _F(0.5)  # Phi(|x|) - 1/2
    np.copysign(poly, x, out=poly)
    poly += _F(0.5)  # Phi(x)
    poly *= x
    return poly


# Rows of the FFN activations handled at once by _bias_gelu_: small enough for
# the ~15 passes of _gelu to stay in the L2 cache (twice as fast as whole arrays).
_GELU_ROWS = 32


def _bias_gelu_(x: np.ndarray, b: np.ndarray) -> None:
    """``x = gelu(x + b)`` in place, a cache-sized block of rows at a time."""
    for i in range(0, x.shape[0], _GELU_ROWS):
        blk = x[i : i + _GELU_ROWS]
        blk += b
        blk[...] = _gelu(blk)


_MEAN_COLS: dict[int, np.ndarray] = {}


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    # Row means as a matrix-vector product: one BLAS call, without the Python
    # overhead of ndarray.mean (it dominated layer norm on short inputs).
    col = _MEAN_COLS.get(x.shape[-1])
    if col is None:
        col = _MEAN_COLS[x.shape[-1]] = np.full((x.shape[-1], 1), 1.0 / x.shape[-1], np.float32)
    xc = x - x @ col
    var = np.square(xc) @ col
    var += np.float32(eps)
    np.sqrt(var, out=var)
    xc /= var
    xc *= w
    xc += b
    return xc


class _Layer:
    __slots__ = ("b1", "b2", "bo", "bqkv", "ln1", "ln2", "w1", "w2", "wo", "wqkv")

    def __init__(self, t: dict[str, np.ndarray]) -> None:
        def f32(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(a, dtype=np.float32)

        # Weights are stored (out, in); keep them (in, out) so x @ w needs no
        # transpose, and fuse Q, K and V into one matmul.
        self.wqkv = f32(
            np.concatenate(
                [
                    t["attention.self.query.weight"].T,
                    t["attention.self.key.weight"].T,
                    t["attention.self.value.weight"].T,
                ],
                axis=1,
            )
        )
        self.bqkv = f32(
            np.concatenate(
                [
                    t["attention.self.query.bias"],
                    t["attention.self.key.bias"],
                    t["attention.self.value.bias"],
                ]
            )
        )
        self.wo = f32(t["attention.output.dense.weight"].T)
        self.bo = f32(t["attention.output.dense.bias"])
        self.ln1 = (
            f32(t["attention.output.LayerNorm.weight"]),
            f32(t["attention.output.LayerNorm.bias"]),
        )
        self.w1 = f32(t["intermediate.dense.weight"].T)
        self.b1 = f32(t["intermediate.dense.bias"])
        self.w2 = f32(t["output.dense.weight"].T)
        self.b2 = f32(t["output.dense.bias"])
        self.ln2 = (f32(t["output.LayerNorm.weight"]), f32(t["output.LayerNorm.bias"]))


class MiniLMEncoder:
    """Sentence embeddings from a sentence-transformers BERT directory.

    ``encode`` is safe to call from several threads at once: the weights are
    read-only and the tokenizer is configured once, here.
    """

    #: Most tokens (batch size times padded length) pushed through the model at once;
    #: bounds the attention matrices to a few tens of MB.
    token_budget = 8192

    def __init__(self, model_dir: str | Path) -> None:
        root = Path(model_dir)
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
        self.hidden = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.head_dim = self.hidden // self.heads
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{root}: unsupported hidden_act {cfg.get('hidden_act')!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{root}: only absolute position embeddings are supported")

        max_len = int(cfg.get("max_position_embeddings", 512))
        st_cfg = root / "sentence_bert_config.json"
        if st_cfg.exists():
            max_len = min(max_len, int(json.loads(st_cfg.read_text())["max_seq_length"]))
        self.max_length = max_len

        self.pooling = "mean"
        pool_cfg = root / "1_Pooling" / "config.json"
        if pool_cfg.exists():
            pc = json.loads(pool_cfg.read_text(encoding="utf-8"))
            if pc.get("pooling_mode_cls_token"):
                self.pooling = "cls"
            elif not pc.get("pooling_mode_mean_tokens", True):
                raise ValueError(f"{pool_cfg}: only mean or CLS pooling is supported")

        raw = load_file(str(root / "model.safetensors"))
        # Exports differ: BertModel keys are bare, BertFor* keys carry "bert.".
        weights = {k.removeprefix("bert."): v for k, v in raw.items()}

        def f32(name: str) -> np.ndarray:
            return np.ascontiguousarray(weights[name], dtype=np.float32)

        self.word_emb = f32("embeddings.word_embeddings.weight")
        self.pos_emb = f32("embeddings.position_embeddings.weight")
        # Single sentences only ever use token type 0.
        self.type_emb = f32("embeddings.token_type_embeddings.weight")[0]
        self.emb_ln = (f32("embeddings.LayerNorm.weight"), f32("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            prefix = f"encoder.layer.{i}."
            self.layers.append(_Layer({k: weights[prefix + k] for k in _LAYER_KEYS}))

        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        # Padding is done per length-sorted batch in encode(), so a batch is
        # padded only to its own longest sentence; the tokenizer must not pad
        # to its saved fixed length.
        self.tokenizer.no_padding()
        self.pad_id = int(cfg.get("pad_token_id", 0) or 0)

    @property
    def dimensions(self) -> int:
        return self.hidden

    def encode(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Embed ``texts``: an ``(n, hidden)`` float32 array of unit vectors,
        and the number of tokens read (special tokens included, after
        truncation)."""
        n = len(texts)
        out = np.empty((n, self.hidden), dtype=np.float32)
        if n == 0:
            return out, 0
        encodings = self.tokenizer.encode_batch(list(texts))
        ids_list = [e.ids for e in encodings]
        lengths = np.fromiter((len(ids) for ids in ids_list), dtype=np.int64, count=n)
        total_tokens = int(lengths.sum())

        # Sentences sorted by length: those of one length are neighbours, so
        # attention runs on unpadded groups (no padding, no mask: no wasted work).
        order = np.argsort(lengths, kind="stable")
        start = 0
        while start < n:
            end, budget = start, 0
            while end < n and (end == start or budget + lengths[order[end]] <= self.token_budget):
                budget += int(lengths[order[end]])
                end += 1
            idx = order[start:end]
            out[idx] = self._forward([ids_list[i] for i in idx], lengths[idx])
            start = end
        return out, total_tokens

    def _forward(self, seqs: list[list[int]], lengths: np.ndarray) -> np.ndarray:
        """Pooled unit vectors of ``seqs`` (sorted by length), computed on the
        concatenated tokens: every layer but attention works token by token, so
        only attention needs to know where a sentence starts."""
        h, nh, hd = self.hidden, self.heads, self.head_dim
        flat = np.fromiter(
            (t for seq in seqs for t in seq), dtype=np.int64, count=int(lengths.sum())
        )
        pos = np.concatenate([np.arange(n) for n in lengths.tolist()])
        x = self.word_emb[flat]
        x += self.pos_emb[pos]
        x += self.type_emb
        x = _layer_norm(x, *self.emb_ln, self.eps)
        t = len(flat)
        # (first row, sentence count, length) of each run of equal lengths.
        groups = []
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        i, m = 0, len(lengths)
        while i < m:
            j = i
            while j < m and lengths[j] == lengths[i]:
                j += 1
            groups.append((int(starts[i]), j - i, int(lengths[i])))
            i = j
        scale = np.float32(1.0 / np.sqrt(hd))
        qkv = np.empty((t, 3 * h), dtype=np.float32)
        ctx = np.empty((t, h), dtype=np.float32)
        y = np.empty((t, h), dtype=np.float32)
        inner = np.empty((t, self.layers[0].w1.shape[1]), dtype=np.float32)
        for layer in self.layers:
            np.matmul(x, layer.wqkv, out=qkv)
            qkv += layer.bqkv
            for row, g, length in groups:
                part = qkv[row : row + g * length].reshape(g, length, 3, nh, hd)
                part = part.transpose(2, 0, 3, 1, 4)
                q, k, v = part[0], part[1], part[2]
                scores = q @ k.transpose(0, 1, 3, 2)
                scores *= scale
                scores -= scores.max(axis=-1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=-1, keepdims=True)
                ctx[row : row + g * length] = (
                    (scores @ v).transpose(0, 2, 1, 3).reshape(g * length, h)
                )
            np.matmul(ctx, layer.wo, out=y)
            y += layer.bo
            y += x
            x = _layer_norm(y, *layer.ln1, self.eps)
            np.matmul(x, layer.w1, out=inner)
            _bias_gelu_(inner, layer.b1)
            np.matmul(inner, layer.w2, out=y)
            y += layer.b2
            y += x
            x = _layer_norm(y, *layer.ln2, self.eps)

        if self.pooling == "cls":
            pooled = x[starts]
        else:
            pooled = np.add.reduceat(x, starts, axis=0)
            pooled /= lengths.astype(np.float32)[:, None]
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)
