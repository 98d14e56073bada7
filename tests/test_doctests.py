"""The `>>>` examples in the docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import re

import pytest

MODULES = [
    "hf_neuralcache.registry",
    "hf_neuralcache.caches.base",
    "hf_neuralcache.caches.sliding_window",
    "hf_neuralcache.caches.tensor_cache",
    "hf_neuralcache.caches.tensor_cache_params",
    "hf_neuralcache.caches.tensor_cache_fit",
    "hf_neuralcache.caches.paged",
    "hf_neuralcache.attention",
    "hf_neuralcache.models",
    "hf_neuralcache.env",
    "hf_neuralcache.cli",
    "hf_neuralcache.hooks.fingerprint",
    "hf_neuralcache.hooks.generate",
    "hf_neuralcache.hooks.inference",
    "hf_neuralcache.hooks.prefix",
    "hf_neuralcache.semantic.cache",
    "hf_neuralcache.semantic.index",
    "hf_neuralcache.semantic.guard",
    "hf_neuralcache.semantic.lexicon",
    "hf_neuralcache.semantic.equivalence",
    "hf_neuralcache.semantic.pair_classifier",
    "hf_neuralcache.testing",
    "hf_neuralcache.kernels.window_attention.naive",
    "hf_neuralcache.kernels.window_attention.dispatch",
    "hf_neuralcache.kernels.paged_attention",
    "hf_neuralcache.kernels.fast_weight.dispatch",
]
FENCE = re.compile(r"^\s*```\w*\s*$", re.MULTILINE)


class FencedParser(doctest.DocTestParser):
    """transformers-style examples sit in ```python fences; the closing fence is not expected output."""

    def parse(self, string, name="<string>"):
        return super().parse(FENCE.sub("", string), name)


def _examples():
    finder = doctest.DocTestFinder(parser=FencedParser())
    for name in MODULES:
        for test in finder.find(importlib.import_module(name)):
            if test.examples:
                yield pytest.param(test, id=test.name)


@pytest.mark.parametrize("test", list(_examples()))
def test_docstring_example(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"{test.name}: {runner.failures} failing example(s); run with -s to see them"


def test_there_are_examples():
    assert len(list(_examples())) >= 4
