// A small RGB canvas for plots: lines, markers, filled rectangles and text in a built-in 5x7
// bitmap font, written as a PNG file (8-bit RGB, zlib-deflated scanlines, CRC-checked chunks).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string_view>
#include <vector>

namespace visikv {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
};

class PngImage {
 public:
  // Throws visikv::Error unless 1 <= width, height <= 16384.
  PngImage(int width, int height, Rgb background = {255, 255, 255});

  int width() const { return width_; }
  int height() const { return height_; }
  Rgb pixel(int x, int y) const;

  // Drawing clips to the canvas.
  void set(int x, int y, Rgb color);
  void fill_rect(int x0, int y0, int x1, int y1, Rgb color);  // inclusive corners
  void line(int x0, int y0, int x1, int y1, Rgb color);
  void dashed_line(int x0, int y0, int x1, int y1, Rgb color, int dash = 6);
  void marker(int x, int y, int radius, Rgb color);  // filled disc
  // Text in the built-in font, each font pixel drawn as scale x scale; (x, y) is the top left.
  // Characters outside the font draw as a box; lower case draws as upper case.
  void text(int x, int y, std::string_view s, Rgb color, int scale = 1);
  // Text rotated a quarter turn counter-clockwise (reads bottom to top), (x, y) its bottom left.
  void text_vertical(int x, int y, std::string_view s, Rgb color, int scale = 1);
  static int text_width(std::string_view s, int scale = 1);
  static int text_height(int scale = 1);

  // The PNG file's bytes, and writing them. write() throws visikv::Error when the file cannot
  // be written.
  std::vector<uint8_t> encode() const;
  void write(const std::filesystem::path& path) const;

 private:
  int width_, height_;
  std::vector<Rgb> pixels_;
};

}  // namespace visikv
