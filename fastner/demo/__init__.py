"""`fastner demo`: a generated financial-news corpus and a small tagger trained on it."""
from fastner.demo.corpus import (ENTITY_TYPES, generate_article_corpus, generate_articles, generate_corpus,
                                 generate_sentence)

__all__ = ["ENTITY_TYPES", "generate_article_corpus", "generate_articles", "generate_corpus", "generate_sentence"]
