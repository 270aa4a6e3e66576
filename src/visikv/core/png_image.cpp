#include "visikv/core/png_image.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <fstream>

#include "visikv/core/error.h"

namespace visikv {

namespace {

constexpr int kGlyphWidth = 5, kGlyphHeight = 7, kAdvance = 6;

struct Glyph {
  char c;
  std::array<const char*, kGlyphHeight> rows;
};

// A 5x7 font drawn for this project: digits, capitals and the punctuation plot labels use.
constexpr Glyph kFont[] = {
    {' ', {".....", ".....", ".....", ".....", ".....", ".....", "....."}},
    {'0', {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."}},
    {'1', {"..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."}},
    {'2', {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"}},
    {'3', {"#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."}},
    {'4', {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."}},
    {'5', {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."}},
    {'6', {"..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."}},
    {'7', {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."}},
    {'8', {".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."}},
    {'9', {".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."}},
    {'A', {".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"}},
    {'B', {"####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."}},
    {'C', {".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."}},
    {'D', {"###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."}},
    {'E', {"#####", "#....", "#....", "####.", "#....", "#....", "#####"}},
    {'F', {"#####", "#....", "#....", "####.", "#....", "#....", "#...."}},
    {'G', {".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"}},
    {'H', {"#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"}},
    {'I', {".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."}},
    {'J', {"..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."}},
    {'K', {"#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"}},
    {'L', {"#....", "#....", "#....", "#....", "#....", "#....", "#####"}},
    {'M', {"#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"}},
    {'N', {"#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"}},
    {'O', {".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."}},
    {'P', {"####.", "#...#", "#...#", "####.", "#....", "#....", "#...."}},
    {'Q', {".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"}},
    {'R', {"####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"}},
    {'S', {".####", "#....", "#....", ".###.", "....#", "....#", "####."}},
    {'T', {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."}},
    {'U', {"#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."}},
    {'V', {"#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."}},
    {'W', {"#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."}},
    {'X', {"#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"}},
    {'Y', {"#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."}},
    {'Z', {"#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"}},
    {'.', {".....", ".....", ".....", ".....", ".....", ".##..", ".##.."}},
    {',', {".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."}},
    {'-', {".....", ".....", ".....", "#####", ".....", ".....", "....."}},
    {'+', {".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."}},
    {'=', {".....", ".....", "#####", ".....", "#####", ".....", "....."}},
    {'(', {"...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."}},
    {')', {".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."}},
    {'/', {".....", "....#", "...#.", "..#..", ".#...", "#....", "....."}},
    {':', {".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."}},
    {'_', {".....", ".....", ".....", ".....", ".....", ".....", "#####"}},
    {'^', {"..#..", ".#.#.", "#...#", ".....", ".....", ".....", "....."}},
    {'<', {"...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."}},
    {'>', {".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."}},
    {'%', {"##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"}},
    {'|', {"..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."}},
    {'*', {".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", "....."}},
    {'\'', {"..#..", "..#..", ".#...", ".....", ".....", ".....", "....."}},
    {'[', {".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###."}},
    {']', {".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###."}},
};

// Characters without a glyph draw as this box.
constexpr Glyph kMissing = {'?', {"#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####"}};

const Glyph& glyph(char c) {
  if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  for (const Glyph& g : kFont)
    if (g.c == c) return g;
  return kMissing;
}

void put_u32(std::vector<uint8_t>& out, uint32_t x) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(x >> shift));
}

// length, type, data, CRC-32 of type and data (big-endian numbers).
void put_chunk(std::vector<uint8_t>& out, const char type[4], const std::vector<uint8_t>& data) {
  put_u32(out, static_cast<uint32_t>(data.size()));
  const size_t type_at = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  const uLong crc =
      crc32(crc32(0L, Z_NULL, 0), out.data() + type_at, static_cast<uInt>(out.size() - type_at));
  put_u32(out, static_cast<uint32_t>(crc));
}

}  // namespace

PngImage::PngImage(int width, int height, Rgb background) : width_(width), height_(height) {
  require(width >= 1 && width <= 16384 && height >= 1 && height <= 16384, "image size ", width, "x",
          height, " is outside 1..16384");
  pixels_.assign(static_cast<size_t>(width) * height, background);
}

Rgb PngImage::pixel(int x, int y) const {
  require(x >= 0 && x < width_ && y >= 0 && y < height_, "pixel (", x, ", ", y,
          ") is outside the image");
  return pixels_[static_cast<size_t>(y) * width_ + x];
}

void PngImage::set(int x, int y, Rgb color) {
  if (x >= 0 && x < width_ && y >= 0 && y < height_)
    pixels_[static_cast<size_t>(y) * width_ + x] = color;
}

void PngImage::fill_rect(int x0, int y0, int x1, int y1, Rgb color) {
  for (int y = std::max(0, std::min(y0, y1)); y <= std::min(height_ - 1, std::max(y0, y1)); ++y)
    for (int x = std::max(0, std::min(x0, x1)); x <= std::min(width_ - 1, std::max(x0, x1)); ++x)
      pixels_[static_cast<size_t>(y) * width_ + x] = color;
}

void PngImage::line(int x0, int y0, int x1, int y1, Rgb color) {
  dashed_line(x0, y0, x1, y1, color, 0);
}

void PngImage::dashed_line(int x0, int y0, int x1, int y1, Rgb color, int dash) {
  // Bresenham; with dash > 0, `dash` pixels on and `dash` off.
  const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
  const int sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
  int error = dx + dy, step = 0;
  while (true) {
    if (dash <= 0 || (step / dash) % 2 == 0) set(x0, y0, color);
    ++step;
    if (x0 == x1 && y0 == y1) break;
    const int e2 = 2 * error;
    if (e2 >= dy) {
      error += dy;
      x0 += sx;
    }
    if (e2 <= dx) {
      error += dx;
      y0 += sy;
    }
  }
}

void PngImage::marker(int x, int y, int radius, Rgb color) {
  for (int dy = -radius; dy <= radius; ++dy)
    for (int dx = -radius; dx <= radius; ++dx)
      if (dx * dx + dy * dy <= radius * radius + radius) set(x + dx, y + dy, color);
}

void PngImage::text(int x, int y, std::string_view s, Rgb color, int scale) {
  for (size_t i = 0; i < s.size(); ++i) {
    const Glyph& g = glyph(s[i]);
    const int left = x + static_cast<int>(i) * kAdvance * scale;
    for (int row = 0; row < kGlyphHeight; ++row)
      for (int col = 0; col < kGlyphWidth; ++col)
        if (g.rows[row][col] == '#')
          fill_rect(left + col * scale, y + row * scale, left + (col + 1) * scale - 1,
                    y + (row + 1) * scale - 1, color);
  }
}

void PngImage::text_vertical(int x, int y, std::string_view s, Rgb color, int scale) {
  for (size_t i = 0; i < s.size(); ++i) {
    const Glyph& g = glyph(s[i]);
    const int bottom = y - static_cast<int>(i) * kAdvance * scale;
    // Glyph column c goes up from the baseline; glyph row r goes right from x.
    for (int row = 0; row < kGlyphHeight; ++row)
      for (int col = 0; col < kGlyphWidth; ++col)
        if (g.rows[row][col] == '#')
          fill_rect(x + row * scale, bottom - (col + 1) * scale + 1, x + (row + 1) * scale - 1,
                    bottom - col * scale, color);
  }
}

int PngImage::text_width(std::string_view s, int scale) {
  return s.empty() ? 0 : (static_cast<int>(s.size()) * kAdvance - 1) * scale;
}

int PngImage::text_height(int scale) { return kGlyphHeight * scale; }

std::vector<uint8_t> PngImage::encode() const {
  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<uint8_t> header;
  put_u32(header, static_cast<uint32_t>(width_));
  put_u32(header, static_cast<uint32_t>(height_));
  header.insert(header.end(), {8, 2, 0, 0, 0});  // 8-bit RGB, deflate, no filter, no interlace
  put_chunk(out, "IHDR", header);
  // Each scanline: filter type 0 (none), then its RGB bytes.
  std::vector<uint8_t> raw;
  raw.reserve(static_cast<size_t>(height_) * (1 + 3 * static_cast<size_t>(width_)));
  for (int y = 0; y < height_; ++y) {
    raw.push_back(0);
    for (int x = 0; x < width_; ++x) {
      const Rgb p = pixels_[static_cast<size_t>(y) * width_ + x];
      raw.insert(raw.end(), {p.r, p.g, p.b});
    }
  }
  uLongf size = compressBound(static_cast<uLong>(raw.size()));
  std::vector<uint8_t> compressed(size);
  require(compress2(compressed.data(), &size, raw.data(), static_cast<uLong>(raw.size()),
                    Z_BEST_COMPRESSION) == Z_OK,
          "PNG: zlib compression failed");
  compressed.resize(size);
  put_chunk(out, "IDAT", compressed);
  put_chunk(out, "IEND", {});
  return out;
}

void PngImage::write(const std::filesystem::path& path) const {
  const std::vector<uint8_t> bytes = encode();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  require(out.good(), "cannot write ", path.string());
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  out.close();
  require(out.good(), "cannot write ", path.string());
}

}  // namespace visikv
