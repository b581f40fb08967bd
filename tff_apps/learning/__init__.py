"""The learning process and its parts, the way TFF composes one.

factory.build_learning_process picks the parts for a job: optimizers, client_works
(FedAvg, FedProx) or dp_sgd (record-level DP), aggregators (mean, compression, clip_zero,
the secure-sum mean) or dp_aggregators (client-level and distributed DP); grouped (the fast
engine, with dense_chain), split_rounds (robust aggregation in Python) and secure_rounds
(masked secure aggregation) are whole processes it returns instead. The parts never import
the factory. Beside them: client_data (a round's input), federation and participation
([clients], [robustness], [communication], [personalization]), personalization,
preprocessing (federated statistics) and vertical (split-model computations).
"""
