"""The library's adapters: `jvila.load(dir).load_adapter(name, peft_dir)` then `generate(..., adapter=name)`
decodes what `peft` + transformers decode greedily."""

import nvila_fixture as fx
import peft
import pytest
import torch
import transformers
from tiny_hf import randomize, transformers_greedy

import jvila
from jvila.models.lora import AdapterError


def test_load_adapter_and_generate_like_peft(tmp_path):
    config = transformers.Qwen2Config(vocab_size=331, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf_model = randomize(transformers.Qwen2ForCausalLM(config))
    base_dir = tmp_path / "qwen2-tiny"
    hf_model.save_pretrained(base_dir)
    for name, content in fx.build_tokenizer_files().items():
        (base_dir / name).write_text(content)
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(r=6, lora_alpha=9, target_modules=["q_proj", "v_proj",
                                                                                                  "up_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.eval().save_pretrained(tmp_path / "adapter")

    model = jvila.load(str(base_dir))
    model.load_adapter("mine", tmp_path / "adapter")
    assert list(model.adapters) == ["mine"] and model.adapters["mine"].rank == 6
    prompt = "Describe the window."
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]),
                                 add_special_tokens=False)
    got = model.generate_token_ids(prompt, max_tokens=8, adapter="mine")[0]
    assert got == transformers_greedy(peft_model, ids, 8, model.tokenizer.eos_ids)
    with peft_model.disable_adapter():
        base = transformers_greedy(peft_model, ids, 8, model.tokenizer.eos_ids)
    assert model.generate_token_ids(prompt, max_tokens=8)[0] == base  # the base weights were not touched
    assert got != base  # the adapter changes the output: the comparison above can fail

    with pytest.raises(AdapterError, match="no adapter named 'other'"):
        model.generate(prompt, adapter="other")
    with pytest.raises(AdapterError, match="above the maximum rank 4"):
        model.load_adapter("big", tmp_path / "adapter", max_rank=4)
    with pytest.raises(AdapterError, match="does not exist"):
        model.load_adapter("gone", tmp_path / "missing")
    model.unload_adapter("mine")
    assert model.adapters == {}
