//! docker's management-command spellings (`kiln image ls`, `kiln builder
//! prune`, `kiln buildx build`, …): each is a name for a command kiln
//! already has, with the flags of that command; `image prune` and
//! `builder prune` prune what docker's do (untagged images; build cache).

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::{build_cmd, image_cmds, registry_cmds, store_cmds};

/// `kiln image …`.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// List images (`kiln images`).
    #[command(alias = "list")]
    Ls(image_cmds::ImagesArgs),
    /// Remove image names (`kiln rmi`).
    #[command(alias = "remove")]
    Rm(image_cmds::RmiArgs),
    /// Show images' configuration (`kiln inspect`).
    Inspect(image_cmds::InspectArgs),
    /// Remove untagged images (`-a`: every image) and the data only they
    /// used; the build cache stays.
    Prune(store_cmds::ImagePruneArgs),
    /// Show the history of an image (`kiln history`).
    History(image_cmds::HistoryArgs),
    /// Give an image another name (`kiln tag`).
    Tag(image_cmds::TagArgs),
    /// Save images to a tar archive (`kiln save`).
    Save(image_cmds::SaveArgs),
    /// Load images from an archive (`kiln load`).
    Load(store_cmds::LoadArgs),
    /// Import a root filesystem tar (`kiln import`).
    Import(store_cmds::ImportArgs),
    /// Push an image (`kiln push`).
    Push(registry_cmds::PushArgs),
    /// Pull an image (`kiln pull`).
    Pull(registry_cmds::PullArgs),
    /// Build an image (`kiln build`).
    Build(Box<build_cmd::BuildArgs>),
}

/// `kiln builder …`.
#[derive(Subcommand, Debug)]
pub enum BuilderCommand {
    /// Remove build cache (`-a`: all of it); images stay.
    Prune(store_cmds::PruneArgs),
    /// Build an image (`kiln build`).
    Build(Box<build_cmd::BuildArgs>),
}

/// `kiln buildx …`.
#[derive(Subcommand, Debug)]
pub enum BuildxCommand {
    /// Build an image (`kiln build`).
    #[command(alias = "b")]
    Build(Box<build_cmd::BuildArgs>),
    /// Remove build cache (`kiln builder prune`).
    Prune(store_cmds::PruneArgs),
}

/// Runs `kiln image …`.
pub fn image(root: &Path, cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Ls(a) => image_cmds::images(root, a),
        ImageCommand::Rm(a) => image_cmds::rmi(root, a),
        ImageCommand::Inspect(a) => image_cmds::inspect(root, a),
        ImageCommand::Prune(a) => store_cmds::image_prune(root, a),
        ImageCommand::History(a) => image_cmds::history(root, a),
        ImageCommand::Tag(a) => image_cmds::tag(root, a),
        ImageCommand::Save(a) => image_cmds::save(root, a),
        ImageCommand::Load(a) => store_cmds::load(root, a),
        ImageCommand::Import(a) => store_cmds::import(root, a),
        ImageCommand::Push(a) => registry_cmds::push(root, a),
        ImageCommand::Pull(a) => registry_cmds::pull(root, a),
        ImageCommand::Build(a) => build_cmd::run(root, *a),
    }
}

/// Runs `kiln builder …`.
pub fn builder(root: &Path, cmd: BuilderCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BuilderCommand::Prune(a) => store_cmds::builder_prune(root, a),
        BuilderCommand::Build(a) => build_cmd::run(root, *a),
    }
}

/// Runs `kiln buildx …`.
pub fn buildx(root: &Path, cmd: BuildxCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BuildxCommand::Build(a) => build_cmd::run(root, *a),
        BuildxCommand::Prune(a) => store_cmds::builder_prune(root, a),
    }
}
