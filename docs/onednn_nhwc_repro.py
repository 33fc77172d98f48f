"""Stand-alone reproduction of oneDNN's NHWC 1x1 stride-2 backward-weights bug (docs/ONEDNN_NHWC_CRASH.md).

Needs only torch (and torchvision for --model). Each case runs in a child process, bounded in time, and computes the weight gradient of one
1x1 stride-2 convolution (C -> 2C channels, a batch of 385 32x32 maps: layer2's downsample convolution of a
width-C ResNet18 in stage 1) twice, with the input channels-last (NHWC) and contiguous (NCHW), and compares both
with a float64 reference. A case ends as: equal (both within float rounding of the reference), WRONG (the NHWC
gradient is not), a signal (SIGSEGV, SIGABRT: "double free or corruption"), or a hang (killed at the timeout).
The child also reports the backward-weights kernel oneDNN created for the NHWC input (ONEDNN_VERBOSE=all).

    python docs/onednn_nhwc_repro.py                    # the default grid: C 4, 8, 16; 1 and 2 threads; ISA default, AVX2
    python docs/onednn_nhwc_repro.py --channels 8 --threads 2 --isa default
    python docs/onednn_nhwc_repro.py --model            # instead: five SGD steps of a width-C ResNet18 on NHWC input

The project avoids the bug by giving every encoder contiguous NCHW input on the CPU
(datasets.tensor_augment.model_layout); this script shows the bug itself.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys

import torch

BATCH, SIZE = 385, 32


def weight_gradient_case(channels: int) -> str:
    """max |grad_NHWC - grad_fp64| and max |grad_NCHW - grad_fp64|, relative to max |grad_fp64|."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 2 * channels, kernel_size=1, stride=2, bias=False)
    x = torch.randn(BATCH, channels, SIZE, SIZE)
    upstream = torch.randn(BATCH, 2 * channels, SIZE // 2, SIZE // 2)

    def gradient(inputs: torch.Tensor) -> torch.Tensor:
        conv.weight.grad = None
        conv(inputs).backward(upstream)
        return conv.weight.grad.double()

    nchw = gradient(x.contiguous())
    nhwc = gradient(x.contiguous(memory_format=torch.channels_last))
    exact = torch.nn.grad.conv2d_weight(x.double(), conv.weight.shape, upstream.double(), stride=2)
    scale = float(exact.abs().max())
    return (f'nhwc_error={float((nhwc - exact).abs().max()) / scale:.2e} '
            f'nchw_error={float((nchw - exact).abs().max()) / scale:.2e}')


def model_case(channels: int) -> str:
    """Five SGD steps of a width-`channels` CIFAR-style ResNet18 trunk (frozen BatchNorm) on an NHWC batch."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(channels), torch.nn.ReLU(),
        *[_stage(channels * 2 ** i, stride=1 if i == 0 else 2) for i in range(4)],
        torch.nn.AdaptiveAvgPool2d(1))
    trunk.train()
    for module in trunk.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    optimiser = torch.optim.SGD(trunk.parameters(), lr=0.01)
    x = torch.randn(BATCH, SIZE, SIZE, 3).permute(0, 3, 1, 2)  # NHWC memory, as a permuted uint8 batch
    for _ in range(5):
        loss = trunk(x).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return f'loss={float(loss):.4f}'


def _stage(planes: int, stride: int) -> torch.nn.Module:
    from torchvision.models.resnet import BasicBlock
    inplanes = planes if stride == 1 else planes // 2
    downsample = None
    if stride != 1:
        downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                         torch.nn.BatchNorm2d(planes))
    return torch.nn.Sequential(BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes))


def kernel_name(verbose_output: str) -> str:
    """The implementation oneDNN created for the NHWC ('acdb') backward-weights pass of the 1x1 stride-2
    convolution (kh1, sh2 in its problem descriptor), e.g. jit_1x1:avx512_core."""
    for line in verbose_output.splitlines():
        fields = line.split(',')
        if (len(fields) > 10 and 'create' in fields[3] and fields[7] == 'backward_weights' and 'acdb' in fields[8]
                and re.search(r'kh1sh2', line)):
            return fields[6]
    return '?'


def run_case(channels: int, threads: int, isa: str, model: bool, timeout: float) -> tuple[str, str, str]:
    """(outcome, kernel, detail) of one case run in a child process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), ONEDNN_VERBOSE='all')
    env.pop('ONEDNN_MAX_CPU_ISA', None)
    if isa != 'default':
        env['ONEDNN_MAX_CPU_ISA'] = isa
    command = [sys.executable, __file__, '--child', '--channels', str(channels)] + (['--model'] if model else [])
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or '')
        return f'hang (killed after {timeout:.0f} s)', kernel_name(output), ''
    kernel = kernel_name(done.stdout)
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:  # a signal without a name
            name = str(-done.returncode)
        return f'signal {name}', kernel, ''
    if done.returncode != 0:
        return f'exit {done.returncode}', kernel, done.stderr.strip().splitlines()[-1] if done.stderr else ''
    result = done.stdout.strip().splitlines()[-1]
    if not model:
        nhwc, nchw = (float(re.search(rf'{name}_error=(\S+)', result).group(1)) for name in ('nhwc', 'nchw'))
        return ('equal' if max(nhwc, nchw) < 1e-4 else 'WRONG'), kernel, result
    return 'finished', kernel, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--channels', type=int, nargs='+', default=[4, 8, 16])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--isa', nargs='+', default=['default', 'AVX2'])
    parser.add_argument('--model', action='store_true', help='five SGD steps of a ResNet18 trunk instead of one conv')
    parser.add_argument('--timeout', type=float, default=60)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print((model_case if args.model else weight_gradient_case)(args.channels[0]), flush=True)
        return 0
    print(f'torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; '
          f'{"ResNet18 trunk, 5 SGD steps" if args.model else "1x1 stride-2 conv, weight gradient"}, '
          f'batch {BATCH}, {SIZE}x{SIZE}, channels-last input')
    print('| channels | threads | ONEDNN_MAX_CPU_ISA | NHWC kernel | outcome | detail |')
    print('|---:|---:|---|---|---|---|')
    for channels in args.channels:
        for threads in args.threads:
            for isa in args.isa:
                outcome, kernel, detail = run_case(channels, threads, isa, args.model, args.timeout)
                print(f'| {channels} | {threads} | {isa} | {kernel} | {outcome} | {detail} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
