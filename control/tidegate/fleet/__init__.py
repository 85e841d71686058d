"""The fleet: rule-set rollouts across many edge hosts, on etcd.

keys.py       the key layout under /tidegate/<fleet>/ and the records
etcd.py       the etcd connection (v3 JSON gateway, failover, TLS)
hostagent.py  the agent's side: watch desired state, apply locally, report on a lease
report.py     what a host reports: shadow would-drops, drift
driver.py     the rollout driver: fleet-wide shadow, waves, bake, halt and revert
views.py      fleet status and history for people and for -o json
cli.py        `tidegate fleet ...`
"""
