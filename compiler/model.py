"""The graphs of the model families, all composed of the same Stack and MemoryModule. Which graph a family uses,
how long its stacks' sequences are and which optional parts it has come from its record in compiler/families.py.
One interface for every graph:

    logits = model(tokens, key_mask)      tokens, key_mask: [B, N, L]   ->   logits [B, N, L, vocab]

where logits[:, c, t] scores the token *after* position t for causal families (shift in the objective) and
token t itself for autoencoders. Families with an encoder also expose `memories(tokens, key_mask)`.
`head=False` returns the final-normed hidden states the head would read ([B, N, L, d]) instead, so that the loss can
run the head on the positions with a target only (compiler.objectives.token_loss, which never holds the logits of
all positions). key_mask None means: no padding. Nothing in a forward pass reads a tensor's value on the host
(no data-dependent Python branch or shape), so a whole training step compiles into one graph.

Component names (what `Stage.freeze` and `Stage.init_from` accept) are the module paths:
encoder.{embedding,layers,norm}, memory.{compress,proj,unroll,pad}, decoder.{embedding,layers,norm,head},
and the three top-level names.
"""
from __future__ import annotations

import functools
import hashlib
import re

import torch
import torch.nn as nn

from compiler import objectives as O
from compiler import plan as P
from compiler.blocks import Stack
from compiler.families import Family, family, in_component, needs_ae_decoder
from compiler.memory import MemoryModule, select_index
from compiler.tokens import vocab_of


def make_stack(cfg, vocab: int, seq_len: int, embedding: bool = True, head: bool = False, encoder=None):
    """A Stack, or a pretrained Backbone standing in its place (compiler/backbone.py: it has its own embedding and
    head); a share_encoder backbone runs `encoder`'s modules."""
    if isinstance(cfg, P.Backbone):
        from compiler.backbone import BackboneModule
        return BackboneModule(cfg, vocab, shared=encoder if cfg.share_encoder else None, seq_len=seq_len)
    return Stack(cfg, vocab, seq_len, embedding=embedding, head=head)


class Graph(nn.Module):
    """Base of every family's graph. `family` is the family's registry record."""

    def __init__(self, plan: P.Plan):
        super().__init__()
        self.family: Family = family(plan)
        self.lengths = self.family.lengths(plan)
        self.n, self.l = plan.memory.chunks, plan.memory.chunk_len  # every graph reads examples of N chunks x L

    def encode(self, tokens, key_mask=None):
        """One memory per row: tokens [M, L] -> [M, d_dec] (families with an encoder). A memory reads one
        position per row. Without padding that is the same position in every row, so the encoder's last block
        computes only from it on; with padding the rows differ and the last block computes every position (the
        earliest one would have to be read on the host, a sync and a data-dependent shape)."""
        m, t = tokens.shape
        idx = select_index(key_mask, m, t, self.memory.cfg.position, tokens.device)
        keep = t if key_mask is not None else min(t, 1 + (self.memory.cfg.position == 'second_last'))
        h = self.encoder(tokens, key_mask=key_mask, keep_last=keep)
        return self.memory.project(h[torch.arange(m, device=h.device), idx - (t - keep)])

    def regenerate(self, stack: str, memories, length: int, head=True):
        """An autoencoding decoder (`stack`: 'decoder' of an autoencoder, 'ae_decoder' of a memory model) regenerates
        `length` tokens from each memory [M, d] -> logits [M, length, vocab] (the decoder never sees tokens)."""
        decoder = getattr(self, stack)
        h = decoder(embeds=self.memory.decoder_input(memories, length))
        return decoder.head(h) if head else h

    @torch.no_grad()
    def read_out(self, memories, tokens, key_mask, ids: O.SpecialIds, via: str):
        """Stored memories [M, d] of M chunks (their tokens, key mask [M, L]) decoded as the graph's training reads a
        memory -> (logits [M, L, vocab], labels [M, L]). via 'decoder' / 'ae_decoder': that stack regenerates the
        chunk (make_example's autoencode labels); 'blank_copy': the memory in the first slot of the chunk after it,
        blank tokens at the chunk's real positions (make_example's blank-copy example and labels)."""
        if via in ('decoder', 'ae_decoder'):
            _, _, labels = O.make_example(P.Objective(kind='autoencode'), tokens, key_mask, ids)
            return self.regenerate(via, memories, tokens.shape[-1]), labels
        return self.blank_copy_read_out(memories, tokens, key_mask, ids)

    @torch.no_grad()
    def encode_rows(self, tokens, key_mask, batch: int):
        """Memories of every chunk of examples [S, N, L] (CPU tensors), `batch` examples at a time on the model's
        device, in eval mode: yields (memories [b, N, d] on the CPU, tokens, key mask), what store.memories.write
        stores. A generator: nothing is encoded until it is read."""
        s, n, l = tokens.shape
        device, was = next(self.parameters()).device, self.training
        self.eval()
        try:
            for i in range(0, s, batch):
                t, m = tokens[i:i + batch], key_mask[i:i + batch]
                mem = self.encode(t.reshape(-1, l).to(device), m.reshape(-1, l).to(device))
                yield mem.view(len(t), n, -1).cpu(), t, m
        finally:
            self.train(was)

    def pretrained_frozen(self) -> list[str]:
        """The pretrained weights that stay frozen in every stage: each backbone's base unless Backbone.train_base
        (compiler.cost.effective_freeze says the same from the plan)."""
        return [f'{top}.base' for top, mod in self.named_children()
                if hasattr(mod, 'members') and mod.shared is None and not mod.cfg.train_base]

    def components(self) -> list[str]:
        """Every freezable component that holds parameters, top-level and second-level names."""
        names = []
        for top, mod in self.named_children():
            if hasattr(mod, 'members'):  # a backbone: its parameter groups (compiler/backbone.py)
                from compiler.backbone import GROUPS
                names += [top] + [f'{top}.{g}' for g in GROUPS if any(True for _ in mod.members(g))] \
                    if mod.members() else []
            elif any(True for _ in mod.parameters()):
                names.append(top)
                names += [f'{top}.{n}' for n, m in mod.named_children() if any(True for _ in m.parameters())]
                names += [f'{top}.{n}' for n, _ in mod.named_parameters(recurse=False)]
        return names


class CausalLM(Graph):
    """clm and full_context: one causal decoder over all N*L tokens."""

    def __init__(self, plan: P.Plan, vocab: int):
        super().__init__(plan)
        self.decoder = make_stack(plan.decoder, vocab, self.lengths['decoder'], head=True)

    def forward(self, tokens, key_mask=None, first_chunk=0, head=True):
        b = tokens.shape[0]
        km = None if key_mask is None else key_mask.reshape(b, -1)
        keep = (self.n - first_chunk) * self.l if first_chunk else None
        h = self.decoder(tokens.reshape(b, -1), key_mask=km, keep_last=keep).view(b, self.n - first_chunk, self.l, -1)
        return self.decoder.head(h) if head else h


def reconstruct(model: Graph, stack: str, tokens, key_mask, head=True):
    """Autoencoding: every chunk -> one memory -> the `stack` decoder regenerates the chunk (unshifted)."""
    b, n, l = tokens.shape
    km = None if key_mask is None else key_mask.reshape(b * n, l)
    mem = model.encode(tokens.reshape(b * n, l), km)
    return model.regenerate(stack, mem, l, head).view(b, n, l, -1)


class Autoencoder(Graph):
    """autoencoder and probe: every chunk is one example; encoder -> one memory -> decoder regenerates it."""

    def __init__(self, plan: P.Plan, vocab: int):
        super().__init__(plan)
        m = plan.memory
        self.encoder = make_stack(plan.encoder, vocab, self.lengths['encoder'])
        self.memory = MemoryModule(m, plan.encoder.d_model, plan.decoder.d_model, former=self.family.forms_memories,
                                   unroll=m.decoder_input == 'unroll', pad=self.family.pad_slot)
        self.decoder = make_stack(plan.decoder, vocab, self.lengths['decoder'], embedding=self.family.token_decoder,
                                  head=True, encoder=self.encoder)

    def memories(self, tokens, key_mask=None):
        b, n, l = tokens.shape
        km = None if key_mask is None else key_mask.reshape(b * n, l)
        return self.encode(tokens.reshape(b * n, l), km).view(b, n, -1)

    def forward(self, tokens, key_mask=None, head=True):
        return reconstruct(self, 'decoder', tokens, key_mask, head)

    autoencode = forward


class ChunkedMemoryLM(Graph):
    """memory, no_memory and oracle. The encoder embeds chunks 0..N-2 in ONE batched call (the family's encoder
    reads each 'chunk', or the whole 'sequence' once: the oracle); the decoder runs every chunk as one batch:
    [slots for chunk c, tokens of chunk c], key masks aligned per chunk."""

    def __init__(self, plan: P.Plan, vocab: int):
        super().__init__(plan)
        m, fam = plan.memory, self.family
        self.variable = m.slots == 'variable'
        self.use_memory, self.oracle = fam.has_encoder, fam.encoder == 'sequence'
        if self.use_memory:
            self.encoder = make_stack(plan.encoder, vocab, self.lengths['encoder'])
        ae = needs_ae_decoder(plan)
        self.memory = MemoryModule(m, plan.encoder.d_model if self.use_memory else None, plan.decoder.d_model,
                                   former=fam.forms_memories, unroll=ae and m.decoder_input == 'unroll',
                                   pad=fam.pad_slot)
        self.decoder = make_stack(plan.decoder, vocab, self.lengths['decoder'], head=True,
                                  encoder=getattr(self, 'encoder', None))
        if ae:
            self.ae_decoder = make_stack(plan.ae_decoder or plan.decoder, vocab, self.l, embedding=False, head=True,
                                         encoder=getattr(self, 'encoder', None))

    def autoencode(self, tokens, key_mask=None, head=True):
        return reconstruct(self, 'ae_decoder', tokens, key_mask, head)

    def memories(self, tokens, key_mask=None):
        """[B, N, L] -> memories of chunks 0..N-2: [B, N-1, d_dec]."""
        b, n, l = tokens.shape
        if self.oracle:  # the encoder sees the whole sequence, future included: an upper bound on memory benefit
            km = None if key_mask is None else key_mask.reshape(b, n * l)
            h = self.encoder(tokens.reshape(b, n * l), key_mask=km)
            idx = torch.arange(n - 1, device=tokens.device) * l + (l - 1)
            h = h[:, idx[:, None] - torch.arange(l - 1, -1, -1, device=tokens.device)]  # [B, N-1, L, d] chunk windows
            km = None if key_mask is None else key_mask[:, :-1].reshape(b * (n - 1), l)
            return self.memory.form(h.reshape(b * (n - 1), l, -1), km).view(b, n - 1, -1)
        km = None if key_mask is None else key_mask[:, :-1].reshape(b * (n - 1), l)
        return self.encode(tokens[:, :-1].reshape(b * (n - 1), l), km).view(b, n - 1, -1)

    def forward(self, tokens, key_mask=None, ablate_memory=False, first_chunk=0, head=True):
        """Logits of chunks first_chunk..N-1 (copy objectives supervise only the second half: the decoder skips
        the rest). ablate_memory: every slot gets the pad embedding (the same decoder, no memory information)."""
        b, n, l = tokens.shape
        mem = self.memories(tokens, key_mask) if self.use_memory and not ablate_memory else None
        slots, slot_mask = self.memory.slots(mem, b, n, self.variable)
        c = slice(first_chunk, n)
        return self.decode(slots[:, c], slot_mask[:, c], tokens[:, c], None if key_mask is None else key_mask[:, c],
                           head)

    def decode(self, slots, slot_mask, tokens, key_mask=None, head=True):
        """The decoder over chunks [B, C, L] after their slots [B, C, S, d] (slot mask [B, C, S]): logits (or hidden
        states) of the token positions [B, C, L, ...]."""
        b, c, l = tokens.shape
        x = torch.cat([slots, self.decoder.embedding(tokens)], dim=2)  # [B, C, S+L, d]
        mask = None  # fixed slots are always attended: without padding nothing is masked
        if key_mask is not None or self.variable:
            tok_mask = torch.ones_like(tokens, dtype=torch.bool) if key_mask is None else key_mask.bool()
            mask = torch.cat([slot_mask, tok_mask], dim=2).reshape(-1, x.shape[2])
        h = self.decoder(embeds=x.reshape(-1, x.shape[2], x.shape[-1]), key_mask=mask, keep_last=l).view(b, c, l, -1)
        return self.decoder.head(h) if head else h  # the head runs on token positions only

    def blank_copy_read_out(self, memories, tokens, key_mask, ids: O.SpecialIds):
        """The blank-copy read-out of stored memories [M, d]: each chunk's memory alone in the slots of the chunk after
        it (the N-chunk layout training uses), that chunk blank at the real positions (make_example's blank-copy
        example); position t predicts token t+1, so the chunk's first token has no prediction."""
        two = lambda x: None if x is None else torch.stack([x, x], 1)  # noqa: E731  (the second half is the copy)
        inputs, mask, labels = O.make_example(P.Objective(kind='blank_copy'), two(tokens), two(key_mask), ids)
        slots, slot_mask = self.memory.chunk_slots(memories[:, None], self.n, self.variable)
        logits = self.decode(slots[:, None], slot_mask[:, None], inputs[:, 1:], None if mask is None else mask[:, 1:])
        return logits[:, 0], labels[:, 1]


class RecurrentMemoryLM(Graph):
    """Recurrent memory transformer baseline: one memory embedding carried chunk to chunk, backprop through time.
    The chunk loop is inherent here (chunk c needs chunk c-1's output); that is the cost this baseline measures."""

    def __init__(self, plan: P.Plan, vocab: int):
        super().__init__(plan)
        m = plan.memory
        self.memory = MemoryModule(m, plan.decoder.d_model, plan.decoder.d_model, former=self.family.forms_memories,
                                   unroll=False, pad=self.family.pad_slot)
        self.decoder = make_stack(plan.decoder, vocab, self.lengths['decoder'], head=True)

    def forward(self, tokens, key_mask=None, first_chunk=0, head=True):
        b, n, l = tokens.shape
        mem = self.memory.pad.expand(b, -1)
        out = []
        for c in range(n):
            km = None if key_mask is None else torch.cat([key_mask.new_ones(b, 1), key_mask[:, c]], 1).bool()
            x = torch.cat([mem[:, None], self.decoder.embedding(tokens[:, c])], 1)
            h = self.decoder(embeds=x, key_mask=km)
            out.append(h[:, 1:])
            mem = self.memory.form(h, km)
        h = torch.stack(out[first_chunk:], 1)
        return self.decoder.head(h) if head else h


class SequenceOracleLM(Graph):
    """The research code's oracle (its MemoryTransformer): the encoder reads the whole N x L sequence, future
    included; its one memory enters a full-context causal decoder over the same tokens (Memory.combine): as a token at
    position 0, concatenated with every token embedding on the hidden dimension (the decoder is that much wider, the
    token embedding that much narrower), or added to every token embedding."""

    def __init__(self, plan: P.Plan, vocab: int):
        super().__init__(plan)
        m = plan.memory
        self.combine = m.combine
        self.encoder = Stack(plan.encoder, vocab, self.lengths['encoder'])
        width = plan.encoder.d_model if m.combine == 'concat' else plan.decoder.d_model
        self.memory = MemoryModule(m, plan.encoder.d_model, width, former=True, unroll=False, pad=False)
        self.decoder = Stack(plan.decoder, vocab, self.lengths['decoder'], head=True)
        if m.combine == 'concat':
            self.decoder.embedding = nn.Embedding(vocab, plan.decoder.d_model - width)

    def memories(self, tokens, key_mask=None):
        """[B, N, L] -> the one memory of each whole sequence [B, 1, d]."""
        b, n, l = tokens.shape
        return self.encode(tokens.reshape(b, n * l), None if key_mask is None else key_mask.reshape(b, n * l))[:, None]

    def forward(self, tokens, key_mask=None, first_chunk=0, head=True):
        b, n, l = tokens.shape
        mem = self.memories(tokens, key_mask)[:, 0]
        x = self.decoder.embedding(tokens.reshape(b, n * l))
        km = None if key_mask is None else key_mask.reshape(b, n * l).bool()
        if self.combine == 'token':
            x = torch.cat([mem[:, None], x], 1)
            km = None if km is None else torch.cat([km.new_ones(b, 1), km], 1)
        elif self.combine == 'concat':
            x = torch.cat([mem[:, None].expand(-1, n * l, -1), x], -1)
        else:
            x = x + mem[:, None]
        keep = (n - first_chunk) * l
        h = self.decoder(embeds=x, key_mask=km, keep_last=keep).view(b, n - first_chunk, l, -1)
        return self.decoder.head(h) if head else h


GRAPHS = {cls.__name__: cls for cls in (CausalLM, Autoencoder, ChunkedMemoryLM, RecurrentMemoryLM,
                                        SequenceOracleLM)}  # Family.graph


def build(plan: P.Plan, vocab: int | None = None, seed: int | None = None) -> Graph:
    """The graph of a (validated) Plan. Seeded: the same plan and seed give the same initial weights."""
    vocab = vocab or vocab_of(plan)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(plan.run.seed if seed is None else seed)
    try:
        model = GRAPHS[family(plan).graph](plan, vocab)
        init_weights(model)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


@functools.cache
def _skip_init_mode():
    """A TorchFunctionMode that skips value-only work on the meta device, where values do not exist: nn.init calls
    and tril/triu (the mixer's mask) keep their input's shape, and on meta tensors they run Python references
    that import torch._dynamo (measured ~2.5 s per build). Thread-local."""
    from torch.overrides import TorchFunctionMode

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if (getattr(func, '__module__', None) == 'torch.nn.init'
                    or getattr(func, '__name__', None) in ('tril', 'triu')):
                return args[0] if args else next(iter((kwargs or {}).values()))
            return func(*args, **(kwargs or {}))

    return SkipInit


def meta_build(plan: P.Plan, vocab: int | None = None) -> Graph:
    """The plan's graph on the meta device: shapes and names only, nothing allocated (checks a checkpoint against
    the graph before a run starts)."""
    with torch.device('meta'), _skip_init_mode()():
        return GRAPHS[family(plan).graph](plan, vocab or vocab_of(plan))


def init_weights(model: nn.Module) -> None:
    """GPT-2 style init: N(0, 0.02) for linear and embedding weights, zero biases; norms and convs keep theirs."""
    pretrained = {id(m) for mod in model.modules() if hasattr(mod, 'members') for m in mod.modules()}
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and id(mod) not in pretrained:
            nn.init.normal_(mod.weight, std=0.02)
            if getattr(mod, 'bias', None) is not None:
                nn.init.zeros_(mod.bias)


ENCODER_PARTS = ('encoder.', 'memory.compress.', 'memory.proj.')  # what Graph.encode reads


def encoder_sha256(state: dict) -> str:
    """sha256 of the tensors of a state dict that form memories (Graph.encode: the encoder, then the memory's
    compression and projection): two stages with the same digest encode the same memories of the same input."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        if name.startswith(ENCODER_PARTS):
            t = t.detach().cpu().contiguous()
            h.update(f'{name} {t.dtype} {tuple(t.shape)}\n'.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parameters_of(model: nn.Module, component: str):
    """(name, parameter) pairs of one component (families.in_component): a module path, a block range
    ('decoder.layers.0-3': blocks 0 to 3), or a backbone's group ('encoder.base', 'encoder.lora', ...)."""
    top, _, part = component.partition('.')
    mod = getattr(model, top, None)
    if hasattr(mod, 'members'):
        return [(f'{top}.{n}', p) for n, p in mod.members(part)]
    m = re.match(r'^(.+\.layers)\.(\d+)-(\d+)$', component)
    if m:
        blocks = [f'{m[1]}.{i}' for i in range(int(m[2]), int(m[3]) + 1)]
        return [(n, p) for n, p in model.named_parameters() if any(in_component(n, b) for b in blocks)]
    return [(n, p) for n, p in model.named_parameters() if in_component(n, component)]
