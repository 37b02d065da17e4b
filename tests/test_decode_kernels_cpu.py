"""The fused Triton decode step (PagedDecode) as MultiLoraModel.generate takes it, in the Triton interpreter.

On CUDA every decode step of generate takes this path; on CPU the torch path does unless
HF_MULTILORA_KERNELS=triton forces the kernels. test_paged_cache drives PagedDecode through a bare PagedCache
with a small explicit block size; here it runs with the model's own block size, mixed adapters whose LoRA
kernels run in the same steps, ragged padding and a block boundary. The spy checks that the fast path really
ran: its results equal the torch path's, so the outputs alone could not tell it was skipped.
"""

import pytest
import torch

from hf_multilora import MultiLoraModel
from hf_multilora.kernels.paged_attention import PagedDecode

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test; on CUDA every generate test runs these kernels"
)

ROWS = ["qv_r4", None, "attn_r8"]  # two adapters and the base, in one batch
PROMPT_LENGTHS = (12, 4, 9)  # left-padded to 12
NEW = 8  # positions 12..18: the decode steps cross the model's first 16-token block boundary


def ragged_prompts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(PROMPT_LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        ids[row, width - n :] = torch.randint(3, 128, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


@pytest.fixture
def decode_launches(monkeypatch) -> list[int]:
    """The page-table width (blocks) of every PagedDecode call: how many ran, and across which blocks."""
    widths = []
    call = PagedDecode.__call__

    def spy(self, q, k, v, block_table, *args, **kwargs):
        widths.append(block_table.shape[1])
        return call(self, q, k, v, block_table, *args, **kwargs)

    monkeypatch.setattr(PagedDecode, "__call__", spy)
    return widths


def test_fused_decode_in_the_interpreter_matches_the_torch_path_and_peft(
    qwen2_zoo, monkeypatch, decode_launches
):
    """Greedy generate with mixed adapters and ragged left padding (GQA): tokens and every step's logits
    through the Triton kernels equal the torch path's, the tokens equal PEFT's per row."""
    model = MultiLoraModel.from_pretrained(qwen2_zoo.fresh_base(), adapters=qwen2_zoo.paths)
    ids, mask = ragged_prompts(seed=4)
    kwargs = dict(
        attention_mask=mask,
        adapter_ids=ROWS,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    monkeypatch.delenv("HF_MULTILORA_KERNELS", raising=False)
    expected = model.generate(ids, **kwargs)
    assert decode_launches == []  # the torch path stores and attends separately
    monkeypatch.setenv("HF_MULTILORA_KERNELS", "triton")
    got = model.generate(ids, **kwargs)

    layers = model.base_model.config.num_hidden_layers
    assert len(decode_launches) == layers * (NEW - 1)  # every decode step of every layer
    assert sorted(set(decode_launches)) == [1, 2]  # the table grew a block mid-generate
    for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"logits of step {step}")
    assert torch.equal(got.sequences, expected.sequences)
    for row, name in enumerate(ROWS):
        reference = qwen2_zoo.base if name is None else qwen2_zoo.peft(name)
        prompt = ids[row : row + 1, mask[row].bool()]
        tokens = reference.generate(
            prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
        assert got.sequences[row, -NEW:].tolist() == tokens[0, -NEW:].tolist(), f"row {row} ({name})"
