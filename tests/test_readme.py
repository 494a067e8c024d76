"""Every code block of README.md runs as written (on the GPU when there is one, else on the CPU).

Python blocks, and the ``msa`` commands of the shell blocks (the first shell
block, ``make bench`` / ``make test``, is what CI itself runs).

Blocks run in order in one namespace, in an empty working directory, as a
reader pasting them into one session would. The namespace starts with what
the README says a reader brings: ``checkpoint``, here a local folder holding a
small dense Llama (a hub name in real use).
"""

import re
import shlex
from pathlib import Path

import pytest
import torch

from msa.cli import main

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
SHELL_BLOCKS = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
COMMANDS = [line.split("#")[0].strip() for block in SHELL_BLOCKS for line in block.splitlines()
            if line.startswith("msa ")]


def test_the_readme_has_code_blocks():
    assert len(BLOCKS) >= 3 and len(COMMANDS) >= 2


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    transformers.LlamaForCausalLM(config).save_pretrained(checkpoint)
    return dict(checkpoint=str(checkpoint), __working_directory__=tmp_path_factory.mktemp("work"))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(namespace, index, monkeypatch):
    monkeypatch.chdir(namespace["__working_directory__"])
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in COMMANDS:
        assert main(shlex.split(command)[1:]) == 0, command
