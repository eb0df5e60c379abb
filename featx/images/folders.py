"""Folder sources: a folder of class sub-folders, walked once, problems collected.

Files ending in :data:`~featx.images.IMAGE_EXTENSIONS` (any case) are collected recursively in
sorted order; hidden entries are skipped; symbolic links are followed once, and loops, broken
links and unreadable folders are reported in :attr:`ImageSource.problems` rather than raised.
"""

from __future__ import annotations

import os

import numpy as np

from featx.exceptions import FeatxError
from featx.images.items import IMAGE_EXTENSIONS, os_reason
from featx.images.source import ImageSource

__all__ = ["open_folder"]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_images(top: str, problems: list[tuple[str, str]], visited: dict[tuple[int, int], str]) -> list[str]:
    """Image files under `top`, recursively, following links once; problems are collected."""
    found: list[str] = []
    pending = [top]
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
        except OSError as exc:
            problems.append((folder, os_reason(exc)))
            continue
        identity = (info.st_dev, info.st_ino)
        if identity in visited:
            earlier = visited[identity]
            if _inside(folder, earlier):
                problems.append((folder, f"symlink loop: leads back to {earlier!r}; skipped"))
            else:
                problems.append((folder, f"same folder as {earlier!r} (linked twice); skipped"))
            continue
        visited[identity] = folder
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as exc:
            problems.append((folder, os_reason(exc)))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    pending.append(entry.path)
                elif entry.is_file():
                    if _is_image_name(entry.name):
                        found.append(entry.path)
                elif entry.is_symlink() and _is_image_name(entry.name):
                    problems.append((entry.path, "broken symbolic link (or a link loop)"))
            except OSError as exc:
                problems.append((entry.path, os_reason(exc)))
    found.sort(key=lambda p: os.path.relpath(p, top).split(os.sep))
    return found


def open_folder(folder: str) -> ImageSource:
    """The source of a folder: its sub-folders are the classes, or its images an unlabelled source."""
    problems: list[tuple[str, str]] = []
    try:
        with os.scandir(folder) as listing:
            entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise FeatxError(f"cannot list the folder {folder!r} ({os_reason(exc)}); check its permissions") from exc
    root_info = os.stat(folder)
    visited = {(root_info.st_dev, root_info.st_ino): folder}
    top_images: list[str] = []
    class_files: dict[str, list[str]] = {}
    empty_folders: list[str] = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and entry.is_file()
        except OSError as exc:
            problems.append((entry.path, os_reason(exc)))
            continue
        if is_dir:
            files = _walk_images(entry.path, problems, visited)
            if files:
                class_files[entry.name] = files
            else:
                empty_folders.append(entry.path)
        elif is_file and _is_image_name(entry.name):
            top_images.append(entry.path)
        elif not is_file and entry.is_symlink() and _is_image_name(entry.name):
            problems.append((entry.path, "broken symbolic link (or a link loop)"))
    if class_files:
        problems += [(path, "image outside the class sub-folders: ignored") for path in top_images]
        problems += [(path, "no images: not used as a class") for path in empty_folders]
        classes = sorted(class_files)
        items = [path for name in classes for path in class_files[name]]
        labels = np.asarray([name for name in classes for _ in class_files[name]], dtype=str)
        return ImageSource(items=items, labels=labels, classes=classes, name=folder, root=folder, problems=problems)
    if top_images:
        return ImageSource(items=top_images, labels=None, classes=None, name=folder, root=folder, problems=problems)
    detail = f" Problems met: {problems[:3]}." if problems else ""
    raise FeatxError(
        f"the folder {folder!r} holds no images. Expected class sub-folders of image files "
        f"({', '.join(IMAGE_EXTENSIONS)}), or image files directly for an unlabelled source.{detail}"
    )
