"""Parts of the latent-reasoning shaper (LatentMorph applied to HiMTok's mask-token decoding).

One concern per module; :mod:`mmseg.modeling.heads.shaper` joins them into the ``shaper`` mask head.

- :mod:`.condenser`  learned queries cross-attending over hidden states (short: invoker/translator summary ``m``;
  long: memory tokens for the latent thought);
- :mod:`.thought`    the frozen LM run over a think-prompt and the memory tokens, giving ``z``;
- :mod:`.translator` ``[z, m, p] -> c``, gated;
- :mod:`.control`    ``c -> K`` control vectors with learnable strengths, averaged into one input-embedding shift;
- :mod:`.code_steer` ``c ->`` terms for the later mask tokens' code logits (optional, ``steer_codes``);
- :mod:`.mismatch`   whether the answer's words name another object than the request: the rounds' scale and an
  invoker input (optional, ``mismatch_probe``);
- :mod:`.invoker`    when to shape: never / always / the entropy rule / a learned Bernoulli policy, with a cap.
"""

from mmseg.modeling.shaper.code_steer import CodeSteer
from mmseg.modeling.shaper.condenser import Condenser
from mmseg.modeling.shaper.control import ControlShaper
from mmseg.modeling.shaper.invoker import (
    INVOKE_MODES,
    PolicyInvoker,
    check_invoke_mode,
    entropy_rounds,
    group_advantages,
    invoker_features,
    normalised_entropy,
    reinforce_loss,
)
from mmseg.modeling.shaper.mismatch import MismatchProbe
from mmseg.modeling.shaper.thought import latent_thought
from mmseg.modeling.shaper.translator import Translator

__all__ = [
    "INVOKE_MODES", "CodeSteer", "Condenser", "ControlShaper", "MismatchProbe", "PolicyInvoker", "Translator",
    "check_invoke_mode", "entropy_rounds",
    "group_advantages",
    "invoker_features", "latent_thought", "normalised_entropy", "reinforce_loss",
]
