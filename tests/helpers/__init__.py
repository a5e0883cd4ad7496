"""Code the tests share (no tests here, no mocks). Modules by concern:

- ``models``: ``TinyRec`` and its optimizer, trained or fresh; Adagrad for deltas; flat state
- ``tensors``: exact equality of state dicts, optimizer states, shard lists, dynamic tables
- ``files``: flipping bits of a file, random contents, writing TorchEasyRec's eval results
- ``paths``: ``REPO``, the repository root
- ``processes``: the ``reckpt`` CLI, scripts and worker modules as child processes; free ports
- ``sharded``: gathering whole tensors over a process group, local shards, fused momentum
- ``torchrec_models``: TorchRec models and sharders for the gloo scenarios
- ``mistakes``: the table of user mistakes (``tests/integration/test_user_mistakes.py``,
  ``scripts/gen_mistakes_doc.py``)

The names most tests use are re-exported here: ``from tests.helpers import trained, flip_bit``.
"""

from tests.helpers.files import flip_bit, flip_byte
from tests.helpers.models import TinyRec, fresh, train, trained
from tests.helpers.tensors import assert_state_dicts_equal, optim_states_equal, state_dicts_equal

__all__ = [
    "TinyRec",
    "assert_state_dicts_equal",
    "flip_bit",
    "flip_byte",
    "fresh",
    "optim_states_equal",
    "state_dicts_equal",
    "train",
    "trained",
]
