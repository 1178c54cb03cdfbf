"""The storage layer: an index directory's shards (sparse Lucene + Seismic, dense FAISS, the feature store, the
text route), read through :class:`IndexReader` and changed only through :class:`IndexWriter`.

It imports neither torch nor the model package: what it needs of a model is a :class:`ModelRecord` (name,
fingerprint, vocabulary, dimensions, sparse source) and the torch-free ``stair_search.vocabulary``, so a process
that only serves shards never loads a model. A shard answers through one narrow interface (:class:`Shard`,
asked with a :class:`ShardQuery`).
"""

from stair_search.index.dense import DenseShard, DenseSpec
from stair_search.index.files import DamagedIndexError, FileChangedError
from stair_search.index.lock import IndexLock, IndexLockedError
from stair_search.index.manifest import IndexMismatchError, Manifest, ModelRecord, ShardInfo
from stair_search.index.reader import STORED_FIELDS, Candidate, IndexReader, ShardOpener
from stair_search.index.shard import LocalShard, Shard, ShardQuery, ShardUnavailable
from stair_search.index.store import FeatureRecord
from stair_search.index.writer import DeleteResult, IndexWriter, delete_documents

__all__ = [
    "STORED_FIELDS", "Candidate", "DamagedIndexError", "DeleteResult", "DenseShard", "DenseSpec", "FeatureRecord",
    "FileChangedError", "IndexLock",
    "IndexLockedError", "IndexMismatchError", "IndexReader", "IndexWriter", "LocalShard", "Manifest", "ModelRecord",
    "Shard", "ShardInfo", "ShardOpener", "ShardQuery", "ShardUnavailable", "delete_documents",
]
