"""`split_clients`: how one computation's argument is cut over the workers (one slice each)."""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff

from tff_apps.runtime.mergeable import split_clients

PAIR = tff.StructWithPythonType([np.str_, np.int32], tuple)


def test_a_clients_struct_before_a_server_value_gives_each_worker_its_own_clients():
    # TFF 0.87's own splitter gave both workers ("/a", 4) here: its struct partition carried on
    # from the SERVER element, restarting at the first client.
    arg_type = tff.StructType([("sites", tff.FederatedType(PAIR, tff.CLIENTS)), ("g", tff.FederatedType(np.float32, tff.SERVER))])
    parts = split_clients([[("/a", 4), ("/bb", 3), ("/ccc", 2)], np.float32(1)], arg_type, 2)
    assert [list(part.sites) for part in parts] == [[("/a", 4), ("/bb", 3)], [("/ccc", 2)]]
    assert [float(part.g) for part in parts] == [1.0, 1.0]


def test_every_clients_value_is_cut_alike_and_all_equal_values_are_replicated():
    arg_type = tff.StructType([
        tff.FederatedType(np.int32, tff.CLIENTS), tff.FederatedType(np.int32, tff.CLIENTS, all_equal=True),
        tff.FederatedType(np.str_, tff.CLIENTS),
    ])
    parts = split_clients([[1, 2, 3, 4], 9, ["a", "b", "c", "d"]], arg_type, 3)
    assert [(list(p[0]), p[1], list(p[2])) for p in parts] == [([1, 2], 9, ["a", "b"]), ([3], 9, ["c"]), ([4], 9, ["d"])]


def test_fewer_clients_than_workers_leaves_the_extra_workers_out():
    parts = split_clients([5], tff.FederatedType(np.int32, tff.CLIENTS), 3)
    assert parts == [[5]]
