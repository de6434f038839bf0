"""Slow oracles, written straight from PyTorch's documented equations, one gate at a time.

Deliberately naive: per-gate weight slices, per-step indexing, explicit loops, no fused ops. It
shares no code with rnnscope.
"""

from __future__ import annotations

import torch
from torch import nn


# The fused module kinds the property tests draw from.
KINDS = {"rnn_tanh": lambda **k: nn.RNN(nonlinearity="tanh", **k),
         "rnn_relu": lambda **k: nn.RNN(nonlinearity="relu", **k),
         "lstm": nn.LSTM, "gru": nn.GRU}


def _blocks(w, n):
    return [w[k * (w.shape[0] // n):(k + 1) * (w.shape[0] // n)] for k in range(n)]


def _lin(x, w, b):
    y = x @ w.t()
    return y if b is None else y + b


def reference_step(kind, p, x_t, h, c=None, nonlinearity="tanh"):
    """One step from the documented equations. p: dict w_ih, w_hh, b_ih, b_hh, w_hr."""
    if kind == "rnn":
        pre = _lin(x_t, p["w_ih"], p["b_ih"]) + _lin(h, p["w_hh"], p["b_hh"])
        return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)), None
    if kind == "lstm":
        wi = _blocks(p["w_ih"], 4)
        wh = _blocks(p["w_hh"], 4)
        bi = _blocks(p["b_ih"], 4) if p["b_ih"] is not None else [None] * 4
        bh = _blocks(p["b_hh"], 4) if p["b_hh"] is not None else [None] * 4
        pre = [_lin(x_t, wi[k], bi[k]) + _lin(h, wh[k], bh[k]) for k in range(4)]
        i, f, g, o = (torch.sigmoid(pre[0]), torch.sigmoid(pre[1]), torch.tanh(pre[2]),
                      torch.sigmoid(pre[3]))
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if p.get("w_hr") is not None:
            h_new = h_new @ p["w_hr"].t()
        return h_new, c_new
    if kind == "gru":
        wi = _blocks(p["w_ih"], 3)
        wh = _blocks(p["w_hh"], 3)
        bi = _blocks(p["b_ih"], 3) if p["b_ih"] is not None else [None] * 3
        bh = _blocks(p["b_hh"], 3) if p["b_hh"] is not None else [None] * 3
        r = torch.sigmoid(_lin(x_t, wi[0], bi[0]) + _lin(h, wh[0], bh[0]))
        z = torch.sigmoid(_lin(x_t, wi[1], bi[1]) + _lin(h, wh[1], bh[1]))
        n = torch.tanh(_lin(x_t, wi[2], bi[2]) + r * _lin(h, wh[2], bh[2]))
        return (1 - z) * n + z * h, None
    raise ValueError(kind)


def module_kind(module):
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "gru"
    return "rnn"


def layer_params(module, layer, direction):
    if isinstance(module, nn.RNNCellBase):
        return {"w_ih": module.weight_ih, "w_hh": module.weight_hh, "b_ih": module.bias_ih,
                "b_hh": module.bias_hh, "w_hr": None}
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    return {k: getattr(module, n + sfx, None) for k, n in
            (("w_ih", "weight_ih"), ("w_hh", "weight_hh"), ("b_ih", "bias_ih"),
             ("b_hh", "bias_hh"), ("w_hr", "weight_hr"))}


def reference_forward(module, x, hx=None, layer_inputs=None):
    """Batch-major x (B, T, I). Returns (output (B, T, D·H_out), h_n, c_n, states) where
    states[l][d] is a list, in processing order, of (h, c) per step (tensors of the graph).
    If `layer_inputs` is a list, each layer's input sequence is appended to it."""
    kind = module_kind(module)
    is_cell = isinstance(module, nn.RNNCellBase)
    L = 1 if is_cell else module.num_layers
    D = 2 if getattr(module, "bidirectional", False) else 1
    H = module.hidden_size
    P = getattr(module, "proj_size", 0) or H
    nonlin = "relu" if getattr(module, "mode", "") == "RNN_RELU" or \
        getattr(module, "nonlinearity", "tanh") == "relu" else "tanh"
    B, T = x.shape[:2]
    if hx is None:
        h0 = x.new_zeros(L * D, B, P)
        c0 = x.new_zeros(L * D, B, H)
    elif kind == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, x.new_zeros(L * D, B, H)
    if is_cell and hx is not None:
        h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
    inp = x
    states, h_n, c_n = [], [], []
    for layer in range(L):
        if layer_inputs is not None:
            layer_inputs.append(inp)
        outs, per_dir = [], []
        for d in range(D):
            p = layer_params(module, layer, d)
            h, c = h0[layer * D + d], c0[layer * D + d]
            order = range(T - 1, -1, -1) if d else range(T)
            seq = [None] * T
            steps = []
            for t in order:
                h, c_new = reference_step(kind, p, inp[:, t], h, c, nonlin)
                c = c_new if c_new is not None else c
                seq[t] = h
                steps.append((h, c_new))
            outs.append(torch.stack(seq, 1))
            per_dir.append(steps)
            h_n.append(h)
            c_n.append(c)
        states.append(per_dir)
        inp = torch.cat(outs, -1)
    return inp, torch.stack(h_n), (torch.stack(c_n) if kind == "lstm" else None), states


def seed_per_sample_loop(model, x):
    """The seed's empirical analysis as a per-sample loop: for each sample alone, loss = sum of
    the output features at the last step, gradient norm per timestep. x batch-major (S, T, I)
    for a batch_first model. Returns (S, T) float64 norms. Uses autograd.grad so that it does
    not accumulate into the model's parameters (the seed's one bug we do not reproduce)."""
    rows = []
    for s in range(x.shape[0]):
        xs = x[s:s + 1].detach().clone().requires_grad_(True)
        out = model(xs)
        out = out[0] if isinstance(out, tuple) else out
        loss = out[0, -1, :].sum()
        (g,) = torch.autograd.grad(loss, xs)
        rows.append(torch.stack([g[0, t, :].norm() for t in range(x.shape[1])]))
    return torch.stack(rows).double()


def module_nonlinearity(module):
    return "relu" if getattr(module, "mode", "") == "RNN_RELU" or \
        getattr(module, "nonlinearity", "tanh") == "relu" else "tanh"


def oracle_cell_jacobians(module, x, hx=None, layer=0, direction=0, state="h"):
    """J[:, n] = ∂s_{T-1}/∂s_n by torch.autograd.functional.jacobian, once per n, on the
    reference loop (float64). Returns (B, T, N, N) in processing order."""
    kind = module_kind(module)
    nonlin = module_nonlinearity(module)
    ins = []
    _, _, _, states = reference_forward(module, x, hx, layer_inputs=ins)
    inp = ins[layer]
    steps = [(h.detach(), None if c is None else c.detach()) for h, c in states[layer][direction]]
    B, T = inp.shape[:2]
    order = list(range(T - 1, -1, -1)) if direction else list(range(T))
    p = layer_params(module, layer, direction)
    P = steps[0][0].shape[-1]
    out = []
    for n in range(T):
        h_n, c_n = steps[n]
        if kind == "lstm":
            H = c_n.shape[-1]
            D = 2 if getattr(module, "bidirectional", False) else 1
            h0 = hx[0][layer * D + direction] if hx is not None else torch.zeros_like(h_n)
            h_prev = steps[n - 1][0] if n else h0
            w_o, b_o = p["w_ih"][3 * H:], None if p["b_ih"] is None else p["b_ih"][3 * H:]
            pre_o = inp[:, order[n]] @ w_o.t() + h_prev @ p["w_hh"][3 * H:].t()
            if b_o is not None:
                pre_o = pre_o + b_o + p["b_hh"][3 * H:]
            o_n = torch.sigmoid(pre_o)

        def run(s, n=n):
            if kind == "lstm" and state == "c":
                c = s
                h = o_n * torch.tanh(c)
                if p.get("w_hr") is not None:
                    h = h @ p["w_hr"].t()
            elif kind == "lstm" and state == "full":
                h, c = s[:, :P], s[:, P:]
            elif kind == "lstm":  # "h": c_n held fixed
                h, c = s, c_n
            else:
                h, c = s, None
            for m in range(n + 1, T):
                h, c_new = reference_step(kind, p, inp[:, order[m]], h, c, nonlin)
                c = c_new if c_new is not None else c
            if kind == "lstm":
                return {"c": c, "h": h, "full": torch.cat([h, c], -1)}[state]
            return h

        if kind == "lstm":
            s0 = {"c": c_n, "h": h_n, "full": torch.cat([h_n, c_n], -1)}[state]
        else:
            s0 = h_n
        J = torch.autograd.functional.jacobian(run, s0)  # (B, N, B, N)
        out.append(torch.stack([J[b, :, b, :] for b in range(B)]))
    return torch.stack(out, 1)


def reference_forward_lengths(module, x, lengths, hx=None, masks=None):
    """Per-sample oracle for variable-length batches and inter-layer dropout.

    x: batch-major padded (B, T, I); lengths: each sample's length (ints, original batch
    order); hx as the module takes it, (L·D, B, ·) in the original batch order. masks: None, or
    one (B, T, D·H_out) multiplier per layer boundary, applied to layer l's output before layer
    l + 1. Every sample runs alone over its own first lengths[b] inputs (direction 1 from
    position lengths[b] − 1 down to 0), as PyTorch documents for packed sequences.
    Returns (output (B, T, D·H_out), zero past each length; h_n; c_n or None).
    """
    kind = module_kind(module)
    L = module.num_layers
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    P = getattr(module, "proj_size", 0) or H
    nonlin = module_nonlinearity(module)
    B, T = x.shape[:2]
    if hx is None:
        h0, c0 = x.new_zeros(L * D, B, P), x.new_zeros(L * D, B, H)
    elif kind == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, x.new_zeros(L * D, B, H)
    outs, h_n, c_n = [], [[None] * B for _ in range(L * D)], [[None] * B for _ in range(L * D)]
    for b in range(B):
        n = int(lengths[b])
        inp = x[b:b + 1, :n]
        for layer in range(L):
            dir_outs = []
            for d in range(D):
                p = layer_params(module, layer, d)
                h, c = h0[layer * D + d, b:b + 1], c0[layer * D + d, b:b + 1]
                seq = [None] * n
                for t in (range(n - 1, -1, -1) if d else range(n)):
                    h, c_new = reference_step(kind, p, inp[:, t], h, c, nonlin)
                    c = c_new if c_new is not None else c
                    seq[t] = h
                dir_outs.append(torch.stack(seq, 1))
                h_n[layer * D + d][b] = h
                c_n[layer * D + d][b] = c
            inp = torch.cat(dir_outs, -1)
            if masks is not None and layer < L - 1:
                inp = inp * masks[layer][b:b + 1, :n]
        outs.append(torch.cat([inp, inp.new_zeros(1, T - n, inp.shape[-1])], 1))
    h_n = torch.stack([torch.cat(row, 0) for row in h_n])
    c_n = torch.stack([torch.cat(row, 0) for row in c_n]) if kind == "lstm" else None
    return torch.cat(outs, 0), h_n, c_n


def fused_layer_by_layer(module, inputs, hx, masks):
    """The module's own fused kernel, one layer at a time, with given inter-layer multipliers.

    Builds a one-layer nn.RNN/LSTM/GRU per layer holding copies of that layer's parameters and
    chains them, multiplying layer l's output by masks[l] ((B, T, D·H_out), batch-major,
    original batch order) before layer l + 1. inputs: a tensor in the module's layout or a
    PackedSequence. With the masks a training-mode module drew, this reproduces the module's
    training-mode output bit for bit. Returns the last layer's output (tensor or PackedSequence).
    """
    from torch.nn.utils.rnn import PackedSequence

    kind = module_kind(module)
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    P = getattr(module, "proj_size", 0) or H
    base = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
    dtype = next(module.parameters()).dtype
    out = inputs
    for layer in range(module.num_layers):
        kw = dict(input_size=module.input_size if layer == 0 else D * P, hidden_size=H,
                  bidirectional=module.bidirectional, bias=module.bias,
                  batch_first=module.batch_first)
        if kind == "lstm":
            kw["proj_size"] = module.proj_size
        if kind == "rnn":
            kw["nonlinearity"] = module_nonlinearity(module)
        one = base(**kw).to(dtype)
        with torch.no_grad():
            for name, prm in one.named_parameters():
                prm.copy_(getattr(module, name.replace("_l0", f"_l{layer}")))
        layer_hx = None
        if hx is not None:
            sl = slice(layer * D, (layer + 1) * D)
            layer_hx = (hx[0][sl], hx[1][sl]) if kind == "lstm" else hx[sl]
        out, _ = one(out, layer_hx)
        if layer < module.num_layers - 1:
            m = masks[layer]
            if isinstance(out, PackedSequence):
                order = (torch.arange(m.shape[0]) if out.sorted_indices is None
                         else out.sorted_indices)
                m_sorted = m[order]
                rows = [m_sorted[:int(bs), t] for t, bs in enumerate(out.batch_sizes)]
                out = PackedSequence(out.data * torch.cat(rows, 0), out.batch_sizes,
                                     out.sorted_indices, out.unsorted_indices)
            else:
                out = out * (m if module.batch_first else m.transpose(0, 1))
    return out
