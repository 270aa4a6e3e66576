"""visikv: an exact inference engine and research toolkit for KV-cache compression.

    import visikv
    model = visikv.Model.load("default")          # or a .gguf file / Hugging Face directory
    ids = model.tokenize("The capital of France")
    logits = model.logits(ids)                    # numpy float32 [tokens, vocab]
    for token in model.generate("Once upon a time", 32, temperature=0.8, seed=1):
        print(token.text, end="", flush=True)
    result = visikv.evaluate("eval kv", "default", tokens=1024)   # the command's JSON, as a dict

Cache codecs (``keys=``, ``values=``) and attention selectors (``selector=``) take the same specs
as the command line (docs/CACHE_SPECS.md, docs/SELECTOR_SPECS.md). Errors raise visikv.Error.
"""

from ._visikv import Error, Generation, Model, Token, kernels, run_command, set_threads, threads

__all__ = [
    "Error",
    "Generation",
    "Model",
    "Token",
    "evaluate",
    "kernels",
    "run",
    "set_threads",
    "threads",
]


def run(*args):
    """Runs a visikv command line in-process, as the program would, e.g.
    ``run("eval", "kv", "default", "--tokens", "1024")``. Returns the JSON the command writes
    (``--json``) as a dict, None for a command that writes none, and ``{"help": text}`` for
    ``--help``. The command's table still goes to standard output."""
    return run_command([str(a) for a in args])


def _flag_words(name, value):
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    if value is False or value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [flag, ",".join(str(v) for v in value)]
    return [flag, str(value)]


def evaluate(command, model, **options):
    """Runs one evaluation command on a model and returns its JSON as a dict, e.g.
    ``evaluate("eval kv", "default", tokens=1024, keys=["int2:g64:tok", "int3:g64:tok"])``.
    ``command`` is a command of the program ("ppl", "analyze", "eval kv", "eval sparse-ppl", ...);
    each option becomes its flag (``tokens=1024`` -> ``--tokens 1024``, ``quick=True`` ->
    ``--quick``, lists are joined with commas); ``model`` is a path, "default" or a Model."""
    if isinstance(model, Model):
        model = model.source
    words = command.split() + [str(model)]
    for name, value in options.items():
        words += _flag_words(name, value)
    return run(*words)


def _perplexity(self, **options):
    """The `ppl` command on this model: its JSON as a dict (options as `visikv.evaluate`)."""
    return evaluate("ppl", self, **options)


Model.perplexity = _perplexity


def _apply_chat_template(self, messages, add_generation_prompt=True, tools=None):
    """The prompt text of a conversation (a list of {"role", "content", ...} dicts), rendered with
    the model's chat template as transformers' ``apply_chat_template(..., tokenize=False)``
    renders it. Tokenize it with ``add_special=False``: the template writes the special tokens."""
    import json

    return self._apply_chat_template(
        json.dumps(messages), add_generation_prompt, None if tools is None else json.dumps(tools)
    )


Model.apply_chat_template = _apply_chat_template
