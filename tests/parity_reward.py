"""A reward term that differs between a random policy's responses (the parity of the text's
length), so that a short run on the untrained tiny policy has groups that dynamic sampling keeps.
Its own light module: reward workers import it by name."""

from pr1_jax.rewards import register_reward


@register_reward("test_parity")
def parity_reward(response: str, ground_truth: str = "") -> float:
    return float(len(response) % 2)
