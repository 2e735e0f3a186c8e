// PNG files written by the host straight from an output's memory: each row
// is copied out of the buffer (checked: never after its release), filtered (none) and deflated; no
// intermediate managed image, no imaging library (Mono ships none usable
// headless).
using System;
using System.IO;
using System.IO.Compression;
using System.Text;

namespace EmbeddedWorker
{
    public static class PngWriter
    {
        static readonly uint[] CrcTable = MakeCrcTable();

        public static void Write(string path, PixelBuffer pixels)
        {
            byte colourType;
            switch (pixels.Channels)
            {
                case 1: colourType = 0; break;
                case 3: colourType = 2; break;
                case 4: colourType = 6; break;
                default: throw new ArgumentException("PNG needs 1, 3 or 4 channels, not " + pixels.Channels);
            }
            int rowBytes = pixels.Width * pixels.Channels;
            var compressed = new MemoryStream();
            compressed.WriteByte(0x78);  // zlib header: deflate, 32 KiB window
            compressed.WriteByte(0x9C);
            uint adler = 1;
            using (var deflate = new DeflateStream(compressed, CompressionLevel.Fastest, true))
            {
                var row = new byte[rowBytes + 1];
                for (int y = 0; y < pixels.Height; y++)
                {
                    row[0] = 0;  // filter: none
                    pixels.CopyRow(y, row, 1);  // ObjectDisposedException, not a crash, if the view was released
                    deflate.Write(row, 0, row.Length);
                    adler = Adler32(adler, row);
                }
            }
            WriteBigEndian(compressed, adler);
            using (var file = new FileStream(path, FileMode.Create, FileAccess.Write))
            {
                file.Write(new byte[] { 137, 80, 78, 71, 13, 10, 26, 10 }, 0, 8);
                var header = new MemoryStream();
                WriteBigEndian(header, (uint)pixels.Width);
                WriteBigEndian(header, (uint)pixels.Height);
                header.Write(new byte[] { 8, colourType, 0, 0, 0 }, 0, 5);
                Chunk(file, "IHDR", header.ToArray());
                Chunk(file, "IDAT", compressed.ToArray());
                Chunk(file, "IEND", new byte[0]);
            }
        }

        static uint Adler32(uint adler, byte[] data)
        {
            uint a = adler & 0xFFFF, b = adler >> 16;
            foreach (var value in data)
            {
                a = (a + value) % 65521;
                b = (b + a) % 65521;
            }
            return (b << 16) | a;
        }

        static void Chunk(Stream stream, string type, byte[] data)
        {
            var typeBytes = Encoding.ASCII.GetBytes(type);
            WriteBigEndian(stream, (uint)data.Length);
            stream.Write(typeBytes, 0, 4);
            stream.Write(data, 0, data.Length);
            uint crc = 0xFFFFFFFF;
            foreach (var value in typeBytes) crc = CrcTable[(crc ^ value) & 0xFF] ^ (crc >> 8);
            foreach (var value in data) crc = CrcTable[(crc ^ value) & 0xFF] ^ (crc >> 8);
            WriteBigEndian(stream, crc ^ 0xFFFFFFFF);
        }

        static void WriteBigEndian(Stream stream, uint value)
        {
            stream.WriteByte((byte)(value >> 24));
            stream.WriteByte((byte)(value >> 16));
            stream.WriteByte((byte)(value >> 8));
            stream.WriteByte((byte)value);
        }

        static uint[] MakeCrcTable()
        {
            var table = new uint[256];
            for (uint n = 0; n < 256; n++)
            {
                uint c = n;
                for (int k = 0; k < 8; k++) c = (c & 1) != 0 ? 0xEDB88320 ^ (c >> 1) : c >> 1;
                table[n] = c;
            }
            return table;
        }
    }
}
