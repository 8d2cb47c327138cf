"""Category-aware semantic cache: a paraphrase of a question already answered gets the answer.

Entry points: `semcache.cache.SemanticCache` (library), `semcache.api.router` (REST, in server.py),
`kvfuse semcache ...` (semcache/cli.py), `semcache.langchain.KvfuseSemanticCache` (LangChain).
"""
