import os
import sys

import pytest

# the repo is flat: tests import prepare_data, tokenizer, ... from the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def run(capsys):
    """run(script, *argv): a script's main in this process -> (exit code, what it printed)."""
    def call(script, *argv):
        try:
            code = script.main(list(argv))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out + out.err
    return call
