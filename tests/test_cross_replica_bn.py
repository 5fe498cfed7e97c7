"""CrossReplicaBatchNorm with a one-replica reduce is nn.BatchNorm (float64 reference); the multi-replica
case is checked against single-process batch norm in test_distributed.py (2 gloo processes)."""

import pytest
import torch
from torch import nn

from largebatch.models import build_model
from largebatch.nn import CrossReplicaBatchNorm, convert_cross_replica_bn


@pytest.mark.parametrize("shape,cls", [((16, 5), nn.BatchNorm1d), ((16, 5, 4, 3), nn.BatchNorm2d),
                                       ((9, 5, 2, 2, 2), nn.BatchNorm3d)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_replica_equals_batch_norm(shape, cls, momentum):
    torch.manual_seed(0)
    ref = cls(5, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    calls = []
    mine = convert_cross_replica_bn(cls(5, momentum=momentum).double(), lambda t: calls.append(t) or t)
    mine.load_state_dict(ref.state_dict())
    assert isinstance(mine, CrossReplicaBatchNorm)
    for step in range(3):
        x = torch.randn(*shape, dtype=torch.float64) * 3 + step
        w = torch.randn(*shape, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        (ref(x1) * w).sum().backward()
        (mine(x2) * w).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(ref.state_dict().items(), mine.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2 * 3  # two reductions per training forward
    ref.eval(), mine.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-12, atol=1e-12)
    assert len(calls) == 6  # eval mode uses running statistics: no communication


def test_fp32_statistics_for_bf16_input_and_channels_last():
    bn = CrossReplicaBatchNorm(8, lambda t: t)
    x = torch.randn(32, 8, 6, 6).to(memory_format=torch.channels_last)
    y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = nn.BatchNorm2d(8)(x.contiguous())
    torch.testing.assert_close(y.float(), ref, rtol=0.02, atol=0.02)


def test_convert_keeps_the_state_dict_of_lenet_bn():
    torch.manual_seed(0)
    model = build_model("lenet-bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = convert_cross_replica_bn(model, lambda t: t)
    assert sum(isinstance(m, CrossReplicaBatchNorm) for m in model.modules()) == 3
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
