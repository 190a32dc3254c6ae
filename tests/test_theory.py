"""The paper's theory checked numerically (Jin & Montana, AAAI 2026, "Theoretical Analysis" and
"Gradient Interpretation of ICQL-QS").

Lemma 1 (Eq. 11) and Lemma 2 (Eq. 13) are checked EXACTLY on random finite multi-agent MDPs: occupancies are
solved as linear systems, not estimated by rollouts. Proposition 1 (Eq. 15-16) is checked on icql_qs.py's own
TD target and critic step.

Occupancy convention used throughout: the normalised discounted STATE occupancy
    d^pi(s) = (1 - gamma) sum_t gamma^t P(s_t = s | s_0 ~ rho0, pi),
i.e. the solution of (I - gamma P_pi^T) d = (1 - gamma) rho0 with P_pi(s, s') = sum_a pi(a|s) P(s'|s, a).
The lemmas' factor gamma / (1 - gamma) is right for this state occupancy: the policies only start to move the
state distribution at t = 1. For the state-ACTION occupancy d(s, a) = d(s) pi(a|s) the action already differs at
t = 0 and the factor would be 1 / (1 - gamma); test_lemma1_near_tight_and_state_action_occupancy_exceeds_it
shows an instance where the state-action version breaks the gamma / (1 - gamma) bound.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

torch.set_num_threads(1)

BOUND_SLACK = 1e-9


# ------------------------------------------------------------------ exact finite-MDP machinery


def random_simplex(rng: np.random.Generator, shape: tuple[int, ...], concentration: float) -> np.ndarray:
    """Dirichlet(concentration) rows over the last axis; small concentrations give near-deterministic rows."""
    x = rng.dirichlet(np.full(shape[-1], concentration), size=shape[:-1])
    x = np.maximum(x, 0.0) + 1e-300  # guard against an all-zero draw at tiny concentrations
    return x / x.sum(-1, keepdims=True)


def product_policy(factors: list[np.ndarray]) -> np.ndarray:
    """prod_i f_i(a_i|s) as a joint table [S, A_1 * ... * A_n] (C order: agent 0's action varies slowest)."""
    joint = factors[0]
    for f in factors[1:]:
        joint = (joint[:, :, None] * f[:, None, :]).reshape(joint.shape[0], -1)
    return joint


def marginals(joint: np.ndarray, action_sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Per-agent marginals mu_i(a_i|s) of a joint policy table [S, prod A]."""
    table = joint.reshape(joint.shape[0], *action_sizes)
    n = len(action_sizes)
    return [table.sum(axis=tuple(1 + j for j in range(n) if j != i)) for i in range(n)]


def state_occupancy(P: np.ndarray, joint_pi: np.ndarray, rho0: np.ndarray, gamma: float) -> np.ndarray:
    """d(s) = (1 - gamma) sum_t gamma^t P(s_t = s): solves (I - gamma P_pi^T) d = (1 - gamma) rho0."""
    P_pi = np.einsum("sa,sat->st", joint_pi, P)
    n_states = P.shape[0]
    return np.linalg.solve(np.eye(n_states) - gamma * P_pi.T, (1.0 - gamma) * rho0)


def tv(p: np.ndarray, q: np.ndarray) -> float:
    """TV = W1 under the 0-1 metric (Eq. 8): 0.5 * ||p - q||_1."""
    return 0.5 * float(np.abs(p - q).sum())


def kernel_tv(p: np.ndarray, q: np.ndarray) -> float:
    """TV between two kernels [S, A]: sup_s 0.5 * ||p(.|s) - q(.|s)||_1 (the paper's TV convention)."""
    return 0.5 * float(np.abs(p - q).sum(-1).max())


def assert_probability_vector(d: np.ndarray) -> None:
    assert np.all(d >= -1e-12), d
    assert abs(d.sum() - 1.0) < 1e-9, d.sum()


def all_subsets(n: int):
    return itertools.chain.from_iterable(itertools.combinations(range(n), k) for k in range(n + 1))


def mixed_policy(S, pis: list[np.ndarray], mus: list[np.ndarray]) -> np.ndarray:
    """pi^(S) = prod_{i in S} pi_i prod_{j not in S} mu_j (Eq. 10), as a joint table."""
    return product_policy([pis[i] if i in S else mus[i] for i in range(len(pis))])


CONCENTRATIONS = (0.1, 0.3, 1.0, 5.0)


def random_instance(rng: np.random.Generator, n: int, n_states: int, action_sizes: tuple[int, ...]):
    """Random transition kernel, initial distribution, factorized mu_i and learned pi_i (some near-deterministic)."""
    n_joint = int(np.prod(action_sizes))
    P = random_simplex(rng, (n_states, n_joint, n_states), float(rng.choice(CONCENTRATIONS)))
    rho0 = random_simplex(rng, (n_states,), float(rng.choice(CONCENTRATIONS)))
    mus = [random_simplex(rng, (n_states, k), float(rng.choice(CONCENTRATIONS))) for k in action_sizes]
    pis = [random_simplex(rng, (n_states, k), float(rng.choice(CONCENTRATIONS))) for k in action_sizes]
    return P, rho0, mus, pis


def lemma1_ratios(P, rho0, mus, pis, gamma) -> list[float]:
    """Checks Lemma 1 for every subset S; returns lhs / rhs for the subsets with rhs > 0."""
    n = len(mus)
    d_empty = state_occupancy(P, mixed_policy((), pis, mus), rho0, gamma)
    assert_probability_vector(d_empty)
    tvs = [kernel_tv(pis[i], mus[i]) for i in range(n)]
    ratios = []
    for S in all_subsets(n):
        d_S = state_occupancy(P, mixed_policy(S, pis, mus), rho0, gamma)
        assert_probability_vector(d_S)
        lhs = tv(d_S, d_empty)
        rhs = gamma / (1.0 - gamma) * sum(tvs[i] for i in S)
        assert lhs <= rhs + BOUND_SLACK, (S, lhs, rhs)
        if rhs > 1e-6:
            ratios.append(lhs / rhs)
    return ratios


# ------------------------------------------------------------------ Lemma 1


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.sampled_from([2, 3]),
    n_states=st.integers(2, 6),
    sizes=st.lists(st.integers(2, 3), min_size=3, max_size=3),
    gamma=st.floats(0.5, 0.99),
)
def test_lemma1_linear_divergence_bound(seed, n, n_states, sizes, gamma):
    rng = np.random.default_rng(seed)
    P, rho0, mus, pis = random_instance(rng, n, n_states, tuple(sizes[:n]))
    lemma1_ratios(P, rho0, mus, pis, gamma)


def test_lemma1_bound_is_not_vacuous_on_random_instances():
    """Over random instances the bound is approached, not only satisfied with a tiny left-hand side."""
    best = 0.0
    for seed in range(40):
        rng = np.random.default_rng(10_000 + seed)
        n = int(rng.choice([2, 3]))
        sizes = tuple(int(k) for k in rng.integers(2, 4, size=n))
        P, rho0, mus, pis = random_instance(rng, n, int(rng.integers(2, 7)), sizes)
        best = max(best, *lemma1_ratios(P, rho0, mus, pis, float(rng.uniform(0.5, 0.99))))
    assert best > 0.1, best


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_lemma1_near_tight_and_state_action_occupancy_exceeds_it(gamma):
    """Two states, two agents with two actions each. In state 0, joint action (1, 0) moves to the absorbing state 1;
    everything else stays. mu never plays it; pi_0 plays action 1 with probability eps at state 0. Then
    TV(d^({0}), d^(empty)) = gamma eps / (1 - gamma + gamma eps) -> gamma / (1 - gamma) * eps: Lemma 1's factor is
    tight. The state-ACTION occupancy differs by eps / (1 - gamma + gamma eps), more than gamma / (1 - gamma) * eps:
    the lemma is about the state occupancy."""
    eps = 1e-4 * (1.0 - gamma)
    P = np.zeros((2, 4, 2))
    P[0, :, 0] = 1.0
    P[0, 2] = [0.0, 1.0]  # joint index 2 = (a_0, a_1) = (1, 0)
    P[1, :, 1] = 1.0
    rho0 = np.array([1.0, 0.0])
    mus = [np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])]
    pis = [np.array([[1.0 - eps, eps], [1.0, 0.0]]), mus[1].copy()]
    ratios = lemma1_ratios(P, rho0, mus, pis, gamma)
    assert max(ratios) > 0.99, ratios

    joint_S, joint_0 = mixed_policy((0,), pis, mus), mixed_policy((), pis, mus)
    d_S = state_occupancy(P, joint_S, rho0, gamma)
    d_0 = state_occupancy(P, joint_0, rho0, gamma)
    assert tv(d_S, d_0) == pytest.approx(gamma * eps / (1.0 - gamma + gamma * eps), rel=1e-9)
    sa_tv = tv(d_S[:, None] * joint_S, d_0[:, None] * joint_0)
    assert sa_tv == pytest.approx(eps / (1.0 - gamma + gamma * eps), rel=1e-9)
    assert sa_tv > gamma / (1.0 - gamma) * kernel_tv(pis[0], mus[0]) * 1.001
    assert sa_tv <= 1.0 / (1.0 - gamma) * kernel_tv(pis[0], mus[0]) + BOUND_SLACK


# ------------------------------------------------------------------ Lemma 2 (correlated behaviour policy)


def excess_correlation(mu: np.ndarray, action_sizes: tuple[int, ...]) -> float:
    """kappa = sup_s TV(mu(.|s), prod_i mu_i(.|s)) (Definition 1)."""
    return kernel_tv(mu, product_policy(marginals(mu, action_sizes)))


def lemma2_check(P, rho0, mu, pis, action_sizes, gamma) -> list[tuple[float, float]]:
    """Checks Eq. (13) for every S (the empty set included); returns (lhs, kappa-free rhs) per S."""
    n = len(action_sizes)
    mus = marginals(mu, action_sizes)
    kappa = excess_correlation(mu, action_sizes)
    d_mu = state_occupancy(P, mu, rho0, gamma)
    assert_probability_vector(d_mu)
    tvs = [kernel_tv(pis[i], mus[i]) for i in range(n)]
    out = []
    for S in all_subsets(n):
        d_S = state_occupancy(P, mixed_policy(S, pis, mus), rho0, gamma)
        assert_probability_vector(d_S)
        lhs = tv(d_S, d_mu)
        rhs_lemma1 = gamma / (1.0 - gamma) * sum(tvs[i] for i in S)
        rhs = gamma / (1.0 - gamma) * (sum(tvs[i] for i in S) + kappa)
        assert lhs <= rhs + BOUND_SLACK, (S, lhs, rhs, kappa)
        out.append((lhs, rhs_lemma1))
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.sampled_from([2, 3]),
    n_states=st.integers(2, 6),
    sizes=st.lists(st.integers(2, 3), min_size=3, max_size=3),
    gamma=st.floats(0.5, 0.99),
    diagonal_weight=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_lemma2_linear_divergence_with_correlations(seed, n, n_states, sizes, gamma, diagonal_weight):
    rng = np.random.default_rng(seed)
    action_sizes = tuple(sizes[:n])
    P, rho0, _, pis = random_instance(rng, n, n_states, action_sizes)
    # a correlated joint behaviour policy: a random joint table, optionally pushed towards "all agents agree"
    mu = random_simplex(rng, (n_states, int(np.prod(action_sizes))), float(rng.choice(CONCENTRATIONS)))
    agree = np.zeros(action_sizes)
    for k in range(min(action_sizes)):
        agree[(k,) * n] = 1.0 / min(action_sizes)
    mu = (1.0 - diagonal_weight) * mu + diagonal_weight * agree.reshape(1, -1)
    lemma2_check(P, rho0, mu, pis, action_sizes, gamma)


@pytest.mark.parametrize("gamma, coupling, eps", [(0.5, 1.0, 0.0), (0.5, 1.0, 0.1), (0.8, 0.6, 0.02)])
def test_kappa_matters_without_factorization(gamma, coupling, eps):
    """Two agents, two actions, two states; any state moves to state 0 if the agents agree and to state 1 otherwise.
    mu = coupling * "agree uniformly" + (1 - coupling) * uniform: uniform marginals, kappa = coupling / 2.
    pi_0 = (0.5 + eps, 0.5 - eps), so pi^({0}) = pi_0 x uniform disagrees w.p. 1/2 and
    W1(d^({0}), d^mu) = gamma * coupling / 2 = gamma * kappa exceeds Lemma 1's kappa-free bound
    gamma / (1 - gamma) * eps, while Lemma 2's bound holds."""
    action_sizes = (2, 2)
    P = np.zeros((2, 4, 2))
    P[:, [0, 3], 0] = 1.0  # (0, 0) and (1, 1): agree
    P[:, [1, 2], 1] = 1.0
    rho0 = np.array([1.0, 0.0])
    agree = np.array([0.5, 0.0, 0.0, 0.5])
    mu = np.tile(coupling * agree + (1.0 - coupling) * np.full(4, 0.25), (2, 1))
    kappa = excess_correlation(mu, action_sizes)
    assert kappa == pytest.approx(coupling / 2)
    pis = [np.tile([0.5 + eps, 0.5 - eps], (2, 1)), np.full((2, 2), 0.5)]

    results = dict(zip(all_subsets(2), lemma2_check(P, rho0, mu, pis, action_sizes, gamma)))
    for S in [(), (0,)]:
        lhs, rhs_lemma1 = results[S]
        assert lhs == pytest.approx(gamma * kappa, rel=1e-9)
        assert lhs > rhs_lemma1 + 1e-3, (S, lhs, rhs_lemma1)


# ------------------------------------------------------------------ Proposition 1 on icql_qs.py


@pytest.fixture(scope="module")
def icql_qs():
    """icql_qs imports common.build, which may still be being written: wait a little for it."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            import icql_qs as module

            return module
        except ModuleNotFoundError as e:
            if e.name != "common.build" or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def prop1_setup(icql_qs, seed=0, b=8):
    torch.manual_seed(seed)
    args = icql_qs.runs.resolve_args(
        icql_qs.Args(task="cn", dataset="random", hidden=16, batch_size=b), icql_qs.TASK_FAMILIES
    )
    spec = icql_qs.get_task("cn")
    nets = icql_qs.make_nets(spec, args, torch.device("cpu"))
    n, o, d = spec.n_agents, spec.obs_dim, spec.act_dim
    obs, next_obs = torch.randn(b, n, o), torch.randn(b, n, o)
    batch = icql_qs.Batch(
        obs=obs,
        actions=torch.rand(b, n, d) * 2 - 1,
        rewards=torch.randn(b, 1),
        next_obs=next_obs,
        next_actions=torch.rand(b, n, d) * 2 - 1,
        dones=(torch.rand(b, 1) < 0.3).float(),
        states=obs.flatten(1),
        next_states=next_obs.flatten(1),
    )
    return args, nets, batch


def grads_of(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, retain_graph=True))


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    scale = max(float(g.abs().max()) for g in want)
    assert scale > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_prop1_individual_td_losses_have_the_averaged_operator_gradient(icql_qs, seed):
    """Eq. (15)-(16): the mean over agents of the n individual TD losses has the gradient of the centralized loss
    with target T^ai Q = mean_i y_i; the losses themselves differ by the (population) variance of the targets."""
    args, nets, batch = prop1_setup(icql_qs, seed)
    y, _ = icql_qs.td_target(batch, nets, args)  # [n, B, 1]
    n, b = batch.actions.shape[1], batch.actions.shape[0]
    assert y.shape == (n, b, 1)
    assert not y.requires_grad  # semi-gradient: the target is fixed w.r.t. theta
    # agent i's next action differs per target, so the individual targets are not all equal
    assert float((y[0] - y[1]).abs().max()) > 1e-4

    params = list(nets.critic.parameters())
    q = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])  # [E, 1, B, 1]
    individual = (q - y).pow(2).mean(dim=(1, 2, 3)).sum()
    centralized = (q - y.mean(0, keepdim=True)).pow(2).mean(dim=(1, 2, 3)).sum()
    assert_grads_close(grads_of(individual, params), grads_of(centralized, params))

    num_members = q.shape[0]
    target_variance = y.var(0, unbiased=False).mean()
    assert float(target_variance) > 1e-8
    gap = (individual - centralized).detach()
    torch.testing.assert_close(gap, num_members * target_variance, rtol=1e-4, atol=1e-6)
    assert float(gap) > 1e-7


class GradRecorder:
    """Stands in for the critic optimizer: keeps the (clipped) gradients critic_step hands to step()."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.grads = [p.grad.detach().clone() for p in self.params]


def test_prop1_holds_for_the_critic_step_itself(icql_qs):
    """icql_qs.critic_step (conservative weight 0, no effective clipping) steps along the gradient of the
    centralized TD loss with the averaged-individual target."""
    args, nets, batch = prop1_setup(icql_qs, seed=3)
    args.alpha, args.grad_clip = 0.0, 1e12
    params = list(nets.critic.parameters())
    recorder = GradRecorder(params)
    torch.manual_seed(123)  # the target-policy smoothing noise of td_target
    icql_qs.critic_step(batch, nets, recorder, args)

    torch.manual_seed(123)
    y, _ = icql_qs.td_target(batch, nets, args)
    assert float((y[0] - y[1]).abs().max()) > 1e-4
    q = nets.critic(batch.states[None], batch.actions.flatten(1)[None, :, None])
    centralized = (q - y.mean(0, keepdim=True)).pow(2).mean(dim=(1, 2, 3)).sum()
    assert_grads_close(recorder.grads, grads_of(centralized, params))
    # ... and NOT along the gradient of a single agent's individual loss (the targets really differ)
    single = (q - y[:1]).pow(2).mean(dim=(1, 2, 3)).sum()
    with pytest.raises(AssertionError):
        assert_grads_close(recorder.grads, grads_of(single, params))
