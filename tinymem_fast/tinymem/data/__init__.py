"""TinyMem data: math sequences, language chunks, memorization artifacts (noise, backdoor), duplication."""
