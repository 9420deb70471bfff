"""The nn.Module side of fastloss: torch.jit.script of any fastloss module (or of a model holding
one) fails with a plain message that points to torch.compile / torch.export, not with TorchScript's
internal compiler errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastloss

#: One instance of every fastloss nn.Module (constructor defaults where there are any).
MODULES = {
    **{name: getattr(fastloss.modules, name) for name in fastloss.modules.__all__},
    "LinearCrossEntropyLoss": lambda: fastloss.LinearCrossEntropyLoss(8, 5),
    "CombinedLoss": lambda: fastloss.CombinedLoss({fastloss.MSELoss(): 0.7, fastloss.L1Loss(): 0.3}),
    "RegularizedLoss": lambda: fastloss.RegularizedLoss(fastloss.MSELoss(), nn.Linear(3, 2), l2=0.1),
}

pytestmark = pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:DeprecationWarning")

NOT_SCRIPTABLE = r"fastloss\.\w+ is not TorchScript-compatible.*torch\.compile.*torch\.export"


def test_every_exported_module_is_listed():
    exported = {name for name in fastloss.__all__
                if isinstance(getattr(fastloss, name), type) and issubclass(getattr(fastloss, name), nn.Module)}
    assert exported == set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_script_says_modules_are_not_torchscript_compatible(name):
    module = MODULES[name]()
    with pytest.raises(RuntimeError, match=NOT_SCRIPTABLE) as info:
        torch.jit.script(module)
    assert f"fastloss.{name} " in str(info.value)


def test_script_of_a_model_holding_a_fastloss_loss():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)
            self.criterion = fastloss.TripletMarginLoss()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    with pytest.raises(RuntimeError, match=NOT_SCRIPTABLE):
        torch.jit.script(Model())


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_still_pickle_and_copy(name):
    """The scripting hook adds no state: state_dict, deepcopy and pickling are unaffected."""
    import copy
    import io
    import pickle

    module = MODULES[name]()
    clone = copy.deepcopy(module)
    assert type(clone) is type(module)
    assert clone.state_dict().keys() == module.state_dict().keys()
    buffer = io.BytesIO()
    pickle.dump(module, buffer)
    buffer.seek(0)
    assert type(pickle.load(buffer)) is type(module)
