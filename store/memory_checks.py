"""What the memory store's readers check before they trust a group (store/memories.py reads through these): its
attributes have the types and values the format gives them, and they agree with its arrays. Anything else is one
message naming the group, exit 2.
"""
from __future__ import annotations

from compiler.errors import UserError

REPAIR = 'restore the store from a backup, or run the spec again (a new run writes its own memories)'

# The group attributes readers use, and what each must be (module doc): a group whose attributes were changed or
# garbled is refused with one message instead of being read wrong (a `dtype` that does not match the data decodes
# float32 memories as bfloat16 bits: accuracy 0, CE nan, and no error).
_WHOLE = (int,)
ATTR_TYPES = {'version': _WHOLE, 'rows': _WHOLE, 'complete': (bool,), 'step': _WHOLE, 'chunks': _WHOLE,
              'chunk_len': _WHOLE, 'memory_dim': _WHOLE, 'encoder_d_model': _WHOLE, 'vocab_size': _WHOLE,
              'run_id': (str,), 'run_key': (str,), 'stage': (str,), 'spec_hash': (str,), 'family': (str,),
              'dtype': (str,), 'storage_dtype': (str,), 'tokenizer_path': (str,), 'checkpoint_path': (str,),
              'encoder_sha256': (str,), 'memories_from': (str,), 'bytes_per_token': (int, float)}
_KINDS = {_WHOLE: 'a whole number', (str,): 'text', (bool,): 'true or false', (int, float): 'a number'}
DTYPES = {'float32': 'float32', 'bfloat16': 'uint16', 'float8_e4m3fn': 'uint8',  # logical dtype -> what the
          'float8_e5m2': 'uint8'}  # memories array holds (store/memories.py: BITS)


def check_attrs(a: dict, stage: str, where: str) -> None:
    """The attributes of group <run>/<stage> have the types and values the format gives them (UserError)."""
    def bad(key, why):
        return UserError(where, f'the stored memories are damaged: group attribute {key} = {repr(a[key])[:60]} '
                         f'{why}', REPAIR)
    for key, types in ATTR_TYPES.items():
        if key in a and a[key] is not None and (not isinstance(a[key], types) or isinstance(a[key], bool)
                                                 and bool not in types):
            raise bad(key, f'is not {_KINDS[types]}')
    for key in ('rows', 'chunks', 'chunk_len', 'memory_dim', 'vocab_size', 'step', 'encoder_d_model'):
        if isinstance(a.get(key), int) and a[key] < 0:
            raise bad(key, 'is negative')
    if a.get('dtype') is not None and a['dtype'] not in DTYPES:
        raise bad('dtype', f"is not one of {', '.join(DTYPES)}")
    if isinstance(a.get('bytes_per_token'), (int, float)) and not a['bytes_per_token'] > 0:
        raise bad('bytes_per_token', 'is not a positive number')
    if a.get('stage') is not None and a['stage'] != stage:
        raise bad('stage', f"does not name this group's stage {stage!r}")


def matching(g):
    """The group (a store.memories.Group), once its attributes agree with its arrays: the dtype with what the
    memories array stores, chunks, chunk_len and memory_dim with the shapes."""
    a, mem, tok = g.attrs, g.memories, g.tokens
    want = DTYPES.get(a.get('dtype') or 'float32')
    found = {'dtype': (want, str(mem.dtype))}
    if a.get('storage_dtype') is not None:
        found['storage_dtype'] = (a['storage_dtype'], str(mem.dtype))
    for key, size in (('chunks', mem.shape[1]), ('memory_dim', mem.shape[2]), ('chunk_len', tok.shape[2])):
        if a.get(key) is not None:
            found[key] = (a[key], size)
    if mem.ndim != 3 or tok.ndim != 3 or g.mask.shape != tok.shape or mem.shape[:2] != tok.shape[:2]:
        raise UserError(g.where, f'the stored memories are damaged: the arrays do not fit together (memories '
                        f'{mem.shape}, tokens {tok.shape}, mask {g.mask.shape})', REPAIR)
    for key, (said, holds) in found.items():
        if said != holds:
            shown = a.get(key)
            raise UserError(g.where, f'the stored memories are damaged: group attribute {key} = {shown!r} does not '
                            f'match the data (the arrays hold {holds}' + (' values)' if 'dtype' in key else ')'),
                            REPAIR)
    return g
