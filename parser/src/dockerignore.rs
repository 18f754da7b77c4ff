//! `.dockerignore` reading and matching with Docker's patternmatcher semantics.
