"""Prompt rendering (rendering.py): templates render in Jinja's immutable sandbox and are named as
files in prompts/ only; a conversation renders by the base model's chat template when it has one;
generated text is made storable before it is logged. No model, no database."""

import pytest
from jinja2.exceptions import SecurityError

from llmops_dagster.infra.settings import PROMPTS_DIR
from llmops_dagster.prompts.rendering import (
    CHAT_TEMPLATE,
    TEMPLATE,
    PromptRenderer,
    RenderingError,
    choose_renderer,
    embedding_text,
    render_prompt,
)
from llmops_dagster.prompts.templates import PromptTemplateError, load_template
from llmops_dagster.serving.app import storable_answer


def test_the_shipped_template_renders_a_prompt():
    template = load_template(PROMPTS_DIR, "customer_support.v1")
    assert "Where is my order A1?" in render_prompt(template, "Where is my order A1?")


@pytest.mark.parametrize("name", ["../README", "../../etc/passwd", "sub/dir", ".hidden", "a..b", ""])
def test_template_names_are_file_names_in_prompts(name):
    with pytest.raises(PromptTemplateError, match="must be a file name"):
        load_template(PROMPTS_DIR, name)


@pytest.mark.parametrize("text", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ prompt.__class__.__init__.__globals__ }}",
    "{% set items = [] %}{{ items.append(prompt) }}",
])
def test_a_template_cannot_reach_python_internals_or_mutate(text):
    with pytest.raises(RenderingError, match="hostile") as refused:
        render_prompt(PromptRenderer(kind=TEMPLATE, name="hostile", text=text), "hi")
    assert isinstance(refused.value.__cause__, SecurityError)


def test_generated_text_loses_what_postgresql_cannot_store():
    assert storable_answer("Order\x00 A1\ud800 ships") == "Order A1 ships"
    assert storable_answer("fine ✅ text") == "fine ✅ text"


CONTEXT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello."}]


def test_the_chat_turns_template_renders_every_turn_of_a_conversation():
    template = load_template(PROMPTS_DIR, "chat_turns.v1")
    text = render_prompt(template, "Where is order A1?", CONTEXT)
    assert text.index("Be brief.") < text.index("Hi") < text.index("Hello.") < text.index("order A1")
    assert text.rstrip().endswith("### Assistant:")
    assert embedding_text("Where is order A1?", CONTEXT) == "Where is order A1?"


def test_auto_rendering_uses_the_tokenizer_chat_template_when_it_has_one(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    template = load_template(PROMPTS_DIR, "customer_support.v1")
    assert choose_renderer("auto", tokenizer, template) == template  # the scratch model has none
    with pytest.raises(RenderingError, match="no single chat template"):
        choose_renderer("chat_template", tokenizer, template)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    renderer = choose_renderer("auto", tokenizer, template)
    assert renderer.kind == CHAT_TEMPLATE
    assert choose_renderer("template", tokenizer, template) == template
    text = render_prompt(renderer, "Where is order A1?", CONTEXT, tokenizer)
    assert text == ("<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello.\n"
                    "<|user|>Where is order A1?\n<|assistant|>")
    question = {"role": "user", "content": "Where is order A1?"}
    assert text == tokenizer.apply_chat_template([*CONTEXT, question], tokenize=False,
                                                 add_generation_prompt=True)
