#!/usr/bin/env python3
"""Regenerates the tiny dataset fixtures in fixtures/data/ (Python standard library only).

Run from the repository root: python3 scripts/make-data-fixtures.py
"""
import gzip
import io
import os
import shutil
import struct
import tarfile
import zipfile
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures', 'data')


def png(w, h, channels, pixel):
    """A PNG of w x h with pixel(x, y) -> tuple of `channels` bytes (1 grey, 3 RGB, 4 RGBA)."""
    color = {1: 0, 3: 2, 4: 6}[channels]
    raw = b''.join(b'\x00' + bytes(v for x in range(w) for v in pixel(x, y)) for y in range(h))

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, color, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw, 9)) + chunk(b'IEND', b''))


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def npy(shape, descr, data):
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (
        descr, ''.join('%d, ' % d for d in shape).rstrip(' ') if len(shape) > 1 else '%d,' % shape[0])
    pad = (64 - (10 + len(header) + 1) % 64) % 64
    header = header + ' ' * pad + '\n'
    return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(header)) + header.encode() + data


def npz(path, members, compression):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, 'w', compression=compression) as z:
        for name, blob in members:
            z.writestr(name + '.npy', blob)


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    # Labelled folder: two classes of 8x8 RGB PNGs (plus a stray text file that is ignored).
    for k, cls in enumerate(['cat', 'dog']):
        for i in range(3):
            write(os.path.join(ROOT, 'folder-labelled', cls, '%d.png' % i),
                  png(8, 8, 3, lambda x, y, k=k, i=i: (200 * k, 30 * i + x, 10 * y)))
    write(os.path.join(ROOT, 'folder-labelled', 'notes.txt'), b'not an image\n')
    # Flat folder: 5 grey 8x8 PNGs, one of them RGBA 10x6 to be resized with --size.
    for i in range(4):
        write(os.path.join(ROOT, 'folder-flat', 'img%d.png' % i), png(8, 8, 1, lambda x, y, i=i: (i * 40 + x + y,)))
    # Different sizes (error without --size).
    write(os.path.join(ROOT, 'mixed-sizes', 'a.png'), png(8, 8, 3, lambda x, y: (x * 30, y * 30, 0)))
    write(os.path.join(ROOT, 'mixed-sizes', 'b.png'), png(12, 6, 4, lambda x, y: (x * 20, y * 40, 90, 255)))
    # A truncated image among good ones.
    for i in range(2):
        write(os.path.join(ROOT, 'bad-image', 'good%d.png' % i), png(8, 8, 3, lambda x, y: (x, y, 7)))
    write(os.path.join(ROOT, 'bad-image', 'truncated.png'), png(8, 8, 3, lambda x, y: (x * 9, y * 3, 1))[:40])
    # An input without images.
    write(os.path.join(ROOT, 'empty', 'README.txt'), b'no images here\n')

    # Archives of the labelled folder (with a top folder, as `tar czf x.tgz folder-labelled`).
    src = os.path.join(ROOT, 'folder-labelled')
    for name, mode in [('labelled.tar', 'w'), ('labelled.tar.gz', 'w:gz'), ('labelled.tgz', 'w:gz')]:
        with tarfile.open(os.path.join(ROOT, name), mode, format=tarfile.USTAR_FORMAT) as t:
            for cls in ['dog', 'cat']:  # out of order on purpose: classes are sorted by name
                for i in range(3):
                    t.add(os.path.join(src, cls, '%d.png' % i), arcname='folder-labelled/%s/%d.png' % (cls, i))
    whole = open(os.path.join(ROOT, 'labelled.tar'), 'rb').read()
    write(os.path.join(ROOT, 'truncated.tar'), whole[:512 * 3 + 100])

    # npz: N,H,W,C uint8 with labels (stored), N,C,H,W with y (deflate), wrong dtype, wrong rank.
    n, h, w = 5, 6, 6
    nhwc = bytes((i * 50 + y * 6 + x + c) % 256 for i in range(n) for y in range(h) for x in range(w) for c in range(3))
    labels = struct.pack('<5q', 0, 1, 2, 1, 0)
    npz(os.path.join(ROOT, 'images-nhwc.npz'),
        [('data', npy((n, h, w, 3), '|u1', nhwc)), ('labels', npy((n,), '<i8', labels))], zipfile.ZIP_STORED)
    nchw = bytes((i * 50 + c * 20 + y * 6 + x) % 256 for i in range(n) for c in range(3) for y in range(h) for x in range(w))
    npz(os.path.join(ROOT, 'images-nchw-deflate.npz'),
        [('x', npy((n, 3, h, w), '|u1', nchw)), ('y', npy((n,), '<i4', struct.pack('<5i', 3, 3, 1, 0, 2)))],
        zipfile.ZIP_DEFLATED)
    npz(os.path.join(ROOT, 'float.npz'), [('arr_0', npy((2, 4, 4, 3), '<f4', b'\x00' * (2 * 48 * 4)))], zipfile.ZIP_STORED)
    npz(os.path.join(ROOT, 'rank5.npz'), [('data', npy((2, 1, 4, 4, 3), '|u1', b'\x01' * 96))], zipfile.ZIP_STORED)

    # MNIST idx: 10 images of 28x28 with labels, gzipped; and 6 images of 8x8 uncompressed, no 5 labels.
    def idx_images(n, h, w):
        return struct.pack('>IIII', 0x803, n, h, w) + bytes(((i * 17 + y * 3 + x) % 7) * 36 for i in range(n) for y in range(h) for x in range(w))

    def idx_labels(labels):
        return struct.pack('>II', 0x801, len(labels)) + bytes(labels)

    write(os.path.join(ROOT, 'mnist-gz', 'train-images-idx3-ubyte.gz'), gzip.compress(idx_images(10, 28, 28), mtime=0))
    write(os.path.join(ROOT, 'mnist-gz', 'train-labels-idx1-ubyte.gz'), gzip.compress(idx_labels([i % 10 for i in range(10)]), mtime=0))
    write(os.path.join(ROOT, 'mnist-plain', 't10k-images-idx3-ubyte'), idx_images(6, 8, 8))
    write(os.path.join(ROOT, 'mnist-plain', 't10k-labels-idx1-ubyte'), idx_labels([0, 1, 2, 0, 1, 2]))


if __name__ == '__main__':
    main()
