//! Shell-word expansion with BuildKit's `shell.Lex` semantics.
