"""Query understanding: what a query says, before any index is touched.

``words`` (the one word splitter and the stop-word lists), ``parse`` (entities, attributes, relations),
``filters`` (metadata filters), ``weights`` (inference-free idf query weights) and ``expand`` (sparse query
expansion with WordNet synonyms, ``wordnet`` being the offline WordNet it reads). The plan, the router and the
rerankers use these; none of them depends on an index or a model.
"""
