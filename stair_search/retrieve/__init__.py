"""Query routing and fusion of the sparse and dense result lists."""
