"""Prompt templates render in Jinja's immutable sandbox, are named as files in prompts/ only, and
generated text is made storable before it is logged. No model, no database."""

import pytest
from jinja2.exceptions import SecurityError

from llmops_dagster.prompts.templates import PromptTemplate, PromptTemplateError, load_template
from llmops_dagster.serving.app import storable_answer
from llmops_dagster.settings import PROMPTS_DIR


def test_the_shipped_template_renders_a_prompt():
    template = load_template(PROMPTS_DIR, "customer_support.v1")
    assert "Where is my order A1?" in template.render("Where is my order A1?")


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
    with pytest.raises(SecurityError):
        PromptTemplate(name="hostile", text=text).render("hi")


def test_generated_text_loses_what_postgresql_cannot_store():
    assert storable_answer("Order\x00 A1\ud800 ships") == "Order A1 ships"
    assert storable_answer("fine ✅ text") == "fine ✅ text"
