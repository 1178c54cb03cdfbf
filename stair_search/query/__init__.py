"""Query understanding: what a query says, before any index is touched.

``words`` (the one word splitter and the stop-word lists), ``parse`` (entities, attributes, relations),
``route`` (the ``auto`` routing decision) and ``expand`` (sparse query expansion with WordNet synonyms,
``wordnet`` being the offline WordNet it reads). The router and the rerankers both use these; none of them
depends on an index or a model.
"""
