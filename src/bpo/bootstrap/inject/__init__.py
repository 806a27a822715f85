"""Error-injected negatives: the gold answer rewritten to be similar but wrong.

- `validate`: every rewrite checked (non-empty, not the gold, length in bounds, preambles cut);
- `lexical`: the deterministic, vocabulary-driven injector (offline, tests, ShapeWorld);
- `prompts`: the few-shot chats that ask a language model for a rewrite;
- `rewriters`: lexical, language-model and endpoint rewriters behind one `rewrite_all`
  interface, made by `make_rewriter` from the `inject:` config.
"""
