#!/usr/bin/env python3
"""Renders the real Hugging Face chat templates with jinja2, the way transformers'
apply_chat_template does (trim_blocks, lstrip_blocks, raise_exception), and prints C++ test cases
for tests/unit/frontend_chat_template_test.cc. Run once by hand when adding a family; the tests
themselves do not need jinja2.

    python3 services/frontend/tools/render_chat_templates.py > /tmp/cases.inc
"""
import json
import os
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Verbatim "chat_template" strings from the models' tokenizer_config.json, one file each:
#   chatml  teknium/OpenHermes-2.5-Mistral-7B      qwen2    Qwen/Qwen2-7B-Instruct
#   llama3  meta-llama/Meta-Llama-3-8B-Instruct    llama31  meta-llama/Llama-3.1-70B-Instruct
#   llama2  meta-llama/Llama-2-13b-chat-hf         mistral  mistralai/Mistral-7B-Instruct-v0.1
#   mixtral mistralai/Mixtral-8x7B-Instruct-v0.1   zephyr   HuggingFaceH4/zephyr-7b-beta
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata", "chat_templates")
NAMES = ["chatml", "qwen2", "llama3", "llama31", "llama2", "mistral", "mixtral", "zephyr"]
TEMPLATES = {n: open(os.path.join(TEMPLATE_DIR, n + ".jinja")).read() for n in NAMES}
TOKENS = {
    "chatml": ("<s>", "<|im_end|>"), "qwen2": ("", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "llama31": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama2": ("<s>", "</s>"), "mistral": ("<s>", "</s>"), "mixtral": ("<s>", "</s>"),
    "zephyr": ("<s>", "</s>"),
}
CONVERSATIONS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "  Arr, hi there!  "},
        {"role": "user", "content": "Où est le trésor? 宝藏"},
    ],
    "user_only": [{"role": "user", "content": "  Tell me a story.\n"}],
}
NO_SYSTEM = {"mistral", "mixtral"}  # the template raises on system: cleave merges it (see .h)


def render(name, messages, add_generation_prompt):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    bos, eos = TOKENS[name]
    if name in NO_SYSTEM and messages[0]["role"] == "system":
        first = dict(messages[1])
        first["content"] = messages[0]["content"] + "\n\n" + first["content"]
        messages = [first] + messages[2:]
    return env.from_string(TEMPLATES[name]).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos, eos_token=eos)


def cpp(s):
    return json.dumps(s, ensure_ascii=False)


for name in TEMPLATES:
    for conv, messages in CONVERSATIONS.items():
        for agp in (True, False):
            print(f'    {{"{name}", "{conv}", {str(agp).lower()}, {cpp(render(name, messages, agp))}}},')
