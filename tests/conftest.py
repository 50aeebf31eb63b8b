import os
import sys

# the repo is flat: tests import prepare_data, tokenizer, ... from the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
