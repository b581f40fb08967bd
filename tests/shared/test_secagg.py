"""Tests for shared.secagg: pairwise-masked secure aggregation (Bonawitz et al. 2017)."""

import dataclasses
import re

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from shared.errors import UserError
from shared.secagg import SecAggServer, secure_sum
from shared.secagg_client import SecAggClient
from shared.secagg_ring import SecAggConfig, SecAggError, dequantize, quantization_error_bound, quantize
from shared.secagg_ring import pairwise_mask, self_mask  # the curious server's tools

# scipy 1.9's kstest calls a NumPy function deprecated in 1.25: third-party noise.
pytestmark = pytest.mark.filterwarnings("ignore:np.find_common_type is deprecated:DeprecationWarning")

N, T, DIM = 8, 5, 4096
CFG = SecAggConfig(n_clients=N, threshold=T, bound=1.0, scale_bits=16)


def random_vectors(n=N, dim=DIM, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-scale, scale, dim) for _ in range(n)]


def assert_sum_within_bound(total, survivors, vectors, cfg):
    """The total is the sum of the survivors' clipped inputs within the bound; returns the error."""
    expected = np.sum([np.clip(vectors[i], -cfg.bound, cfg.bound) for i in survivors], axis=0)
    error = np.max(np.abs(total - expected))
    assert error <= quantization_error_bound(cfg, len(survivors))
    return error


def uniformity_p_values(masked, ring_bits=32):
    """Chi-square on the top 8 bits (256 bins) and Kolmogorov-Smirnov against U[0, 1)."""
    top = (masked >> (ring_bits - 8)).astype(np.int64)
    chi2 = stats.chisquare(np.bincount(top, minlength=256)).pvalue
    ks = stats.kstest(masked.astype(np.float64) / 2.0**ring_bits, "uniform").pvalue
    return chi2, ks


def run_protocol(cfg, vectors, dropped_after_sharing=(), withheld_masked=(), seed=0):
    """Drive clients and server by hand (the server only ever sees messages).

    Clients in `withheld_masked` compute their masked input but it never reaches the
    server (a late arrival). Seeded, so statistical checks on masked values are
    deterministic. Returns the server, its float total, every masked input, the key list.
    """
    clients = [SecAggClient(i, cfg, seed=f"test/{seed}/{i}".encode()) for i in range(cfg.n_clients)]
    server = SecAggServer(cfg)
    key_list = server.collect_keys([c.advertise_keys() for c in clients])
    inboxes = server.route_shares([c.share_keys(key_list) for c in clients])
    active = [c for c in clients if c.client_id not in dropped_after_sharing]
    masked = {c.client_id: c.masked_input(vectors[c.client_id], inboxes[c.client_id]) for c in active}
    request = server.collect_masked_inputs([m for i, m in masked.items() if i not in withheld_masked])
    survivors = [c for c in active if c.client_id in request.survivors]
    total = server.unmask([c.unmask(request) for c in survivors])
    return server, total, {i: m.masked for i, m in masked.items()}, key_list


# --- configuration and quantization ----------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_clients=10, threshold=5, bound=1.0, scale_bits=16), "n_clients/2 < threshold"),
        (dict(n_clients=10, threshold=11, bound=1.0, scale_bits=16), "got 11"),
        (dict(n_clients=1, threshold=1, bound=1.0, scale_bits=16), "at least 2"),
        (dict(n_clients=4, threshold=3, bound=0.0, scale_bits=16), "bound"),
        (dict(n_clients=4, threshold=3, bound=float("nan"), scale_bits=16), "bound"),
        (dict(n_clients=4, threshold=3, bound=1.0, scale_bits=16, ring_bits=16), "ring_bits"),
        (dict(n_clients=4, threshold=3, bound=1e-6, scale_bits=8), "rounds to 0"),
        (dict(n_clients=4, threshold=3, bound=1.0, scale_bits=30), "wrap around; lower scale_bits or bound, or use ring_bits = 64"),
        (dict(n_clients=4, threshold=3.0, bound=1.0, scale_bits=16), "integer"),
    ],
)
def test_config_rejects_bad_values_with_a_user_error(kwargs, words):
    with pytest.raises(UserError, match=re.escape(words)):
        SecAggConfig(**kwargs)


def test_config_accepts_a_sum_that_just_fits_the_ring():
    # 2 * round(bound * 2**16) = 2**31 - 2 fits; one more level would not.
    fits = SecAggConfig(n_clients=2, threshold=2, bound=(2**30 - 1) / 2**16, scale_bits=16)
    assert 2 * fits.max_level == 2**31 - 2
    with pytest.raises(UserError):
        SecAggConfig(n_clients=2, threshold=2, bound=2**30 / 2**16, scale_bits=16)
    extreme = np.array([fits.bound] * 3)
    total = quantize(extreme, fits) + quantize(extreme, fits)
    np.testing.assert_array_equal(dequantize(total, fits, 2), 2 * extreme)


def test_quantize_rounds_clips_and_wraps_negatives_in_twos_complement():
    q = quantize(np.array([0.0, 1.0, -1.0, 0.25 + 2**-18, 7.0, -7.0]), CFG)
    assert q.dtype == np.uint32
    np.testing.assert_array_equal(q.view(np.int32), [0, 65536, -65536, 16384, 65536, -65536])
    assert q[2] == 2**32 - 65536


def test_quantize_and_dequantize_round_trip_within_half_a_step():
    x = np.random.default_rng(1).uniform(-1, 1, 10_000)
    error = np.abs(dequantize(quantize(x, CFG), CFG, 1) - x)
    assert error.max() <= quantization_error_bound(CFG, 1) == 0.5 / 2**16
    assert error.max() > 0.9 * quantization_error_bound(CFG, 1)


def test_quantize_refuses_nan_and_inf_and_non_vectors():
    with pytest.raises(ValueError, match="1 of 3 values are NaN or infinite"):
        quantize(np.array([0.0, np.nan, 1.0]), CFG)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize(np.array([np.inf]), CFG)
    with pytest.raises(ValueError, match="1-D"):
        quantize(np.zeros((2, 2)), CFG)


def test_dequantize_refuses_a_vector_that_cannot_be_a_sum_of_n_inputs():
    masked_looking = np.random.default_rng(0).integers(0, 2**32, 100, dtype=np.uint64).astype(np.uint32)
    with pytest.raises(ValueError, match="not a sum of 8 quantized vectors"):
        dequantize(masked_looking, CFG, 8)


# --- correctness -------------------------------------------------------------------


def test_unmasked_sum_equals_the_plain_sum_within_the_quantization_bound():
    vectors = random_vectors()
    result = secure_sum(vectors, CFG, seed=3)
    assert result.survivors == tuple(range(N)) and result.dropped == ()
    error = assert_sum_within_bound(result.total, result.survivors, vectors, CFG)
    bound = quantization_error_bound(CFG, N)
    # tight-ish: the worst of 4096 entries, each a sum of 8 rounding errors, is a sizable part of the bound
    assert bound / 4 < error <= bound
    assert result.total.dtype == np.float64 and result.total.shape == (DIM,)


def test_a_64_bit_ring_sums_with_finer_precision():
    cfg = SecAggConfig(n_clients=5, threshold=3, bound=10.0, scale_bits=40, ring_bits=64)
    vectors = random_vectors(n=5, dim=2000, scale=10.0)
    result = secure_sum(vectors, cfg, dropouts_after_sharing=[2], seed=1)
    assert result.masked_inputs[0].dtype == np.uint64
    assert 0 < assert_sum_within_bound(result.total, result.survivors, vectors, cfg) < 1e-10


def test_values_outside_the_bound_are_clipped_and_the_sum_is_the_clipped_sum():
    vectors = random_vectors(scale=3.0)
    assert max(np.abs(v).max() for v in vectors) > 2.9
    result = secure_sum(vectors, CFG, seed=4)
    assert_sum_within_bound(result.total, result.survivors, vectors, CFG)
    assert np.max(np.abs(result.total - np.sum(vectors, axis=0))) > 1.0  # not the unclipped sum


@pytest.mark.parametrize("dropouts", [[0], [N - 1], [1, 4, 6], [0, 1, 2], list(range(T, N))])
def test_up_to_n_minus_t_dropouts_after_sharing_are_recovered(dropouts):
    vectors = random_vectors(seed=len(dropouts))
    result = secure_sum(vectors, CFG, dropouts_after_sharing=dropouts)
    assert result.dropped == tuple(dropouts)
    assert result.survivors == tuple(i for i in range(N) if i not in dropouts)
    assert set(result.masked_inputs) == set(result.survivors)
    assert_sum_within_bound(result.total, result.survivors, vectors, CFG)


def test_clients_silent_in_the_unmask_round_still_count_if_t_answer():
    vectors = random_vectors()
    result = secure_sum(vectors, CFG, dropouts_after_sharing=[5], dropouts_after_masking=[0, 7])
    assert result.survivors == (0, 1, 2, 3, 4, 6, 7)
    assert_sum_within_bound(result.total, result.survivors, vectors, CFG)


def test_more_than_n_minus_t_dropouts_fail_without_a_sum():
    with pytest.raises(SecAggError, match=r"round 2 \(masked input\): 4 of 8 clients responded, the threshold is 5"):
        secure_sum(random_vectors(), CFG, dropouts_after_sharing=[0, 2, 4, 6])


def test_fewer_than_t_answers_in_the_unmask_round_fail_without_a_sum():
    with pytest.raises(SecAggError, match=r"round 3 \(unmask\): 4 of 6 clients responded, the threshold is 5"):
        secure_sum(random_vectors(), CFG, dropouts_after_sharing=[0, 1], dropouts_after_masking=[2, 3])


def test_the_sum_is_exact_and_identical_whatever_the_randomness():
    vectors = random_vectors()
    first, second = secure_sum(vectors, CFG), secure_sum(vectors, CFG)
    np.testing.assert_array_equal(first.total, second.total)


# --- what the server sees ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["zeros", "constant", "random"])
def test_masked_inputs_are_indistinguishable_from_uniform(kind):
    inputs = {"zeros": [np.zeros(DIM)] * N, "constant": [np.full(DIM, 0.5)] * N, "random": random_vectors()}[kind]
    result = secure_sum(inputs, CFG, dropouts_after_sharing=[3], seed=11)
    for client, masked in result.masked_inputs.items():
        assert masked.dtype == np.uint32
        chi2, ks = uniformity_p_values(masked)
        assert chi2 > 1e-3 and ks > 1e-3, (kind, client, chi2, ks)
        # the test has power: the unmasked input fails it outright
        assert max(uniformity_p_values(quantize(inputs[client], CFG))) < 1e-10


def test_identical_inputs_give_different_masked_inputs():
    result = secure_sum([np.full(DIM, 0.25)] * N, CFG, seed=5)
    masked = list(result.masked_inputs.values())
    for i in range(N):
        for j in range(i + 1, N):
            assert np.mean(masked[i] == masked[j]) < 1e-3


def test_no_masked_input_equals_or_leaks_a_quantized_input():
    vectors = random_vectors()
    vectors[2] = np.zeros(DIM)
    result = secure_sum(vectors, CFG, dropouts_after_sharing=[6], seed=8)
    quantized = [quantize(v, CFG) for v in vectors]
    for masked in result.masked_inputs.values():
        for q in quantized:
            assert np.mean(masked == q) < 1e-3  # chance coincidences only (about DIM / 2**32)


def all_arrays(value, seen=None):
    """Every numpy array reachable from an object's attributes, dicts and sequences."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        children = list(value.keys()) + list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    elif dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
        children = list(vars(value).values())
    else:
        return []
    return [a for child in children for a in all_arrays(child, seen)]


def test_the_server_state_holds_no_unmasked_individual_vector():
    vectors = random_vectors()
    server, total, _, _ = run_protocol(CFG, vectors, dropped_after_sharing=[1, 5])
    arrays = all_arrays(server)
    assert arrays, "the server keeps its running masked sum"
    quantized = [quantize(v, CFG) for v in vectors]
    for array in arrays:
        for q, x in zip(quantized, vectors):
            assert not (array.shape == q.shape and np.mean(array == q) > 1e-3)
            assert not (array.shape == x.shape and np.allclose(array, x, atol=1e-3))
    assert_sum_within_bound(total, server.survivors, vectors, CFG)


def test_a_curious_server_cannot_unmask_one_survivor_with_what_it_reconstructs():
    vectors = random_vectors()
    server, _, masked, _ = run_protocol(CFG, vectors, dropped_after_sharing=[4])
    seeds = server._self_mask_seeds  # b_w of every survivor: the server learns these
    assert set(seeds) == set(server.survivors) and set(server._dropped_mask_keys) == {4}
    for u in server.survivors:
        stripped = masked[u] - self_mask(seeds[u], DIM, CFG)  # only pairwise masks left
        assert np.mean(stripped == quantize(vectors[u], CFG)) < 1e-3
        assert min(uniformity_p_values(stripped)) > 1e-3


def test_a_dropped_clients_late_input_stays_masked_by_its_self_mask():
    vectors = random_vectors()
    vectors[3] = np.zeros(DIM)  # the easiest input to spot
    server, total, masked, key_list = run_protocol(CFG, vectors, withheld_masked=[3])
    assert server.dropped == (3,)
    assert_sum_within_bound(total, server.survivors, vectors, CFG)
    # The server learnt s_3^SK, so it can strip every pairwise mask of client 3's late y_3 ...
    key = X25519PrivateKey.from_private_bytes(server._dropped_mask_keys[3])
    stripped = masked[3].copy()
    for advert in key_list.keys:
        v = advert.client_id
        if v != 3:
            mask = pairwise_mask(key, advert.mask_public_key, 3, v, DIM, CFG)
            stripped = stripped - mask if v > 3 else stripped + mask
    # ... but never got b_3, so what remains still looks uniform, not like zeros.
    assert 3 not in server._self_mask_seeds
    assert np.mean(stripped == 0) < 1e-3
    assert min(uniformity_p_values(stripped)) > 1e-3


def test_shares_relayed_by_the_server_are_authenticated():
    clients = [SecAggClient(i, CFG) for i in range(N)]
    server = SecAggServer(CFG)
    key_list = server.collect_keys([c.advertise_keys() for c in clients])
    inboxes = server.route_shares([c.share_keys(key_list) for c in clients])
    inbox = inboxes[0]
    first = inbox.shares[0]
    flipped = bytes([first.ciphertext[0] ^ 1]) + first.ciphertext[1:]
    tampered = dataclasses.replace(inbox, shares=(dataclasses.replace(first, ciphertext=flipped),) + inbox.shares[1:])
    with pytest.raises(SecAggError, match="fail authentication"):
        clients[0].masked_input(np.zeros(10), tampered)


def test_a_client_answers_one_unmask_request_and_only_a_consistent_one():
    clients = [SecAggClient(i, CFG) for i in range(N)]
    server = SecAggServer(CFG)
    key_list = server.collect_keys([c.advertise_keys() for c in clients])
    inboxes = server.route_shares([c.share_keys(key_list) for c in clients])
    request = server.collect_masked_inputs([c.masked_input(np.zeros(10), inboxes[c.client_id]) for c in clients])
    too_few = dataclasses.replace(request, survivors=request.survivors[:T - 1])
    with pytest.raises(SecAggError, match="4 of 8 clients responded, the threshold is 5"):
        clients[0].unmask(too_few)
    fresh = [SecAggClient(i, CFG) for i in range(N)]  # clients[0] is now spent; use a new round
    server = SecAggServer(CFG)
    key_list = server.collect_keys([c.advertise_keys() for c in fresh])
    inboxes = server.route_shares([c.share_keys(key_list) for c in fresh])
    request = server.collect_masked_inputs([c.masked_input(np.zeros(10), inboxes[c.client_id]) for c in fresh])
    response = fresh[1].unmask(request)
    assert {w for w, _ in response.self_mask_shares} == set(range(N)) and response.mask_key_shares == ()
    with pytest.raises(SecAggError, match="unmask called at stage 'done'"):
        fresh[1].unmask(dataclasses.replace(request, survivors=request.survivors[1:]))


def test_the_server_refuses_repeated_or_unknown_senders_and_out_of_order_calls():
    clients = [SecAggClient(i, CFG) for i in range(N)]
    server = SecAggServer(CFG)
    adverts = [c.advertise_keys() for c in clients]
    with pytest.raises(SecAggError, match="repeated message from client 0"):
        server.collect_keys(adverts + [adverts[0]])
    server = SecAggServer(CFG)
    with pytest.raises(SecAggError, match="out of order"):
        server.unmask([])


# --- randomness and reporting --------------------------------------------------------


def test_masked_inputs_are_reproducible_only_when_seeded():
    vectors = random_vectors(n=N, dim=500)
    seeded = [secure_sum(vectors, CFG, seed=s).masked_inputs for s in (7, 7, 8)]
    fresh = [secure_sum(vectors, CFG).masked_inputs for _ in range(2)]
    for i in range(N):
        np.testing.assert_array_equal(seeded[0][i], seeded[1][i])
        assert not np.array_equal(seeded[0][i], seeded[2][i])
        assert not np.array_equal(fresh[0][i], fresh[1][i])


def test_result_reports_bytes_and_time_per_round():
    result = secure_sum(random_vectors(dim=1000), CFG, dropouts_after_sharing=[0])
    assert [r.name for r in result.rounds] == ["advertise_keys", "share_keys", "masked_input", "unmask"]
    assert result.bytes_per_round["advertise_keys"] == N * 68 + N * N * 68
    masked = result.rounds[2]
    assert masked.bytes_to_server == (N - 1) * (4 + 4 * 1000)
    assert all(r.seconds >= 0 for r in result.rounds) and result.seconds >= sum(r.seconds for r in result.rounds)
