"""Why language models are trained and scored with cross-entropy, not MSE, in numbers.

    python scripts/losses_demo.py                    # the lesson, with GPT-2's vocabulary (50257)
    python scripts/losses_demo.py --vocab-size 128256

Every loss, log-sum-exp, perplexity and bits-per-byte below is computed by lmloss itself
(lmloss.token_nll, cross_entropy, logsumexp, perplexity, bits_per_byte).
"""

import argparse
import math

import torch
import torch.nn.functional as F

import lmloss


def regression_mse():
    pred, true = torch.tensor([2.1, 2.9, 5.0]), torch.tensor([2.0, 3.0, 5.0])
    mse = F.mse_loss(pred, true).item()
    print("1. Regression: a number is close or far, so squared error fits.")
    print(f"   MSE([2.1, 2.9, 5.0], [2, 3, 5]) = {mse:.5f}")


def softmax_and_cross_entropy():
    logits = torch.tensor([[3.0, 1.0, 0.5]])  # (1, 3): one position, three classes
    probs = torch.exp(logits - lmloss.logsumexp(logits)[:, None])  # softmax = exp(z - logsumexp(z))
    print("2. Classification: the model gives logits, softmax turns them into probabilities.")
    print(f"   softmax([3.0, 1.0, 0.5]) = [{', '.join(f'{p:.3f}' for p in probs[0].tolist())}]")
    for target, word in ((1, "confidently wrong"), (0, "right")):
        nll = lmloss.token_nll(logits, torch.tensor([target])).item()
        print(f"   cross-entropy, target {target} ({word}): -ln p[{target}] = {nll:.3f} nats")


def gradient_fading():
    print("3. Gradient on the correct class's logit as its probability p falls (3 classes):")
    print("   p_correct   |dMSE(probs)/dz|   |dCE/dz|")
    for p_correct in (0.9, 0.5, 0.1, 0.01, 0.001):
        rest = (1.0 - p_correct) / 2
        logits = torch.tensor([[math.log(p_correct), math.log(rest), math.log(rest)]], requires_grad=True)
        target = torch.tensor([0])
        F.mse_loss(torch.softmax(logits, dim=-1), F.one_hot(target, 3).float()).backward()
        mse_grad = logits.grad[0, 0].abs().item()
        logits.grad = None
        lmloss.cross_entropy(logits, target).backward()  # d CE / d z_correct = p - 1
        ce_grad = logits.grad[0, 0].abs().item()
        print(f"   {p_correct:9.3f}   {mse_grad:16.6f}   {ce_grad:8.4f}")
    print("   MSE's push vanishes exactly when the model is most wrong; cross-entropy's tends to 1.")


def uniform_guess(vocab_size: int):
    logits = torch.zeros(4, vocab_size)  # (N, V) knows nothing: every token equally likely
    targets = torch.tensor([0, 11, 464, vocab_size - 1])
    nll = lmloss.token_nll(logits, targets)  # (N,) nats
    print(f"4. Uniform logits over {vocab_size} tokens: CE = ln {vocab_size} = "
          f"{nll.mean().item():.3f} nats/token, perplexity = {lmloss.perplexity(nll.sum(), 4):.0f}")


def conversions():
    nll_nats, n_tokens, n_bytes = 3000.0, 1000, 4200  # e.g. 1000 tokens encoding 4200 UTF-8 bytes
    ce = nll_nats / n_tokens
    print("5. Conversions, from summed nats (never a mean of per-batch ratios):")
    print(f"   CE = {ce:.3f} nats/token -> perplexity = exp(CE) = {lmloss.perplexity(nll_nats, n_tokens):.2f}")
    print(f"   bits-per-byte = CE * tokens / (ln 2 * bytes) = {ce:.1f} * {n_tokens} / (ln 2 * {n_bytes}) = "
          f"{lmloss.bits_per_byte(nll_nats, n_bytes):.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=50257, help="vocabulary of the uniform guess")
    args = parser.parse_args()
    regression_mse()
    softmax_and_cross_entropy()
    gradient_fading()
    uniform_guess(args.vocab_size)
    conversions()


if __name__ == "__main__":
    main()
