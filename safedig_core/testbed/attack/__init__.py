"""Attacks against the steered testbed model (`safedig attack`), judged by the world classifier.

- `targets`: the models under attack, rebuilt from what `safedig demo` wrote per seed (unsteered, word
  filter, dense difference of means, SafeDIG at the τ the demo chose);
- `space`: the phrasings the discrete attack may use (the world's vocabulary, synonyms, implicit phrasings);
- `discrete`: a genetic word-substitution attack with a fixed query budget (Ring-A-Bell / P4D in spirit);
- `sampler`: the differentiable sampling loop (the real block patches on the raw DiT, Euler + CFG);
- `soft`: the white-box attack on the text-token states, bounded in L2, and the smallest bound that succeeds;
- `run`: one seed end to end; `report`: means with intervals, `attack.json` and `attack.md`;
- `picture`: `attack.png`, the best adversarial prompt per concept with the images it produces.
"""
