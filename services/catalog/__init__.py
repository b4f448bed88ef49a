"""The catalog: the resources every service shares, one module each, so that the services read
them from here and never from each other.

    datasets.py     DatasetInfo, dataset_path / parse_dataset_path, DATASETS, shards and records
    factor_sets.py  FactorSetInfo, factor_set_path / parse_factor_set_path, FACTOR_SETS, publish/load
    indexes.py      IndexInfo (parts, shards, damping), index_path / parse_index_path, INDEXES
    results.py      ResultInfo, result_path / parse_result_path, RESULTS, publish
    collection.py   what the four have in common: names, store prefixes, open/read/list/delete
    links.py        registering a directory on the server in place

Each resource's store prefix ("factors/{id}/" for factorSets/{id}) and its files' names live
here and nowhere else; a job's own keys (jobs/{id}/...) live in system/layout.py.
"""
