// Design notes
// - A request (an anonymous object, a POCO, a dictionary, a list, scalars)
//   becomes a Python dict through the C API, in one walk. What reflection
//   costs is paid once per type: each type's public properties are read
//   through compiled getters, and their snake_case names are kept as Python
//   strings made once for the process (released at shutdown).
// - Returns a new reference; the caller owns it. Call with the GIL held.
#pragma warning disable 612  // PyObject.Handle: read only while the object is alive, as the C API path needs
using System;
using System.Collections;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Globalization;
using System.Linq.Expressions;
using System.Reflection;

namespace EmbeddedWorker
{
    internal static class RequestWriter
    {
        sealed class Shape
        {
            public IntPtr[] Names;  // owned: one reference each, for the process
            public Func<object, object>[] Getters;
        }

        static readonly ConcurrentDictionary<Type, Shape> Shapes = new ConcurrentDictionary<Type, Shape>();
        static readonly ConcurrentDictionary<string, IntPtr> Names = new ConcurrentDictionary<string, IntPtr>();

        /// <summary>A Python object for `value`, or IntPtr.Zero with the Python error pending.</summary>
        public static IntPtr Write(object value, int depth = 0)
        {
            if (depth > 64) throw new ArgumentException("the request nests deeper than 64 levels (a cycle?)");
            if (value == null) return Borrowed(PythonApi.None);
            var text = value as string;
            if (text != null) return PythonApi.NewString(text);
            if (value is bool) return Borrowed((bool)value ? PythonApi.True : PythonApi.False);
            if (value is int) return PythonApi.FromLong((int)value);
            if (value is long) return PythonApi.FromLong((long)value);
            if (value is double) return PythonApi.FromDouble((double)value);
            if (value is float) return PythonApi.FromDouble((float)value);
            if (value is decimal) return PythonApi.FromDouble((double)(decimal)value);
            if (value is short || value is byte || value is uint || value is sbyte || value is ushort)
                return PythonApi.FromLong(Convert.ToInt64(value, CultureInfo.InvariantCulture));
            if (value is ulong) return PythonApi.FromDouble((ulong)value);
            if (value is Guid) return PythonApi.NewString(((Guid)value).ToString("D"));
            if (value is DateTime) return PythonApi.NewString(((DateTime)value).ToUniversalTime().ToString("o"));
            if (value is DateTimeOffset) return PythonApi.NewString(((DateTimeOffset)value).ToUniversalTime().ToString("o"));
            if (value is TimeSpan) return PythonApi.FromDouble(((TimeSpan)value).TotalSeconds);
            if (value is Enum) return PythonApi.NewString(PyConvert.SnakeCase(value.ToString()));
            var python = value as Python.Runtime.PyObject;
            if (python != null) return Borrowed(python.Handle);
            var reply = value as Reply;
            if (reply != null) return WriteDictionary(reply.Fields, depth);
            var dictionary = value as IDictionary;
            if (dictionary != null) return WriteDictionary(dictionary, depth);
            var sequence = value as IEnumerable;
            if (sequence != null) return WriteList(sequence, depth);
            return WriteObject(value, depth);
        }

        static IntPtr Borrowed(IntPtr value)
        {
            PythonApi.IncRef(value);
            return value;
        }

        static IntPtr WriteDictionary(IDictionary dictionary, int depth)
        {
            var dict = PythonApi.NewDict();
            foreach (DictionaryEntry entry in dictionary)
            {
                var key = PythonApi.NewString(Convert.ToString(entry.Key, CultureInfo.InvariantCulture));
                if (!Set(dict, key, Write(entry.Value, depth + 1), true)) return IntPtr.Zero;
            }
            return dict;
        }

        static IntPtr WriteList(IEnumerable sequence, int depth)
        {
            var items = new List<IntPtr>();
            foreach (var element in sequence)
            {
                var item = Write(element, depth + 1);
                if (item == IntPtr.Zero)
                {
                    foreach (var made in items) PythonApi.DecRef(made);
                    return IntPtr.Zero;
                }
                items.Add(item);
            }
            var list = PythonApi.NewList((IntPtr)items.Count);
            for (int i = 0; i < items.Count; i++) PythonApi.ListSet(list, (IntPtr)i, items[i]);  // steals
            return list;
        }

        static IntPtr WriteObject(object value, int depth)
        {
            var shape = Shapes.GetOrAdd(value.GetType(), MakeShape);
            var dict = PythonApi.NewDict();
            for (int i = 0; i < shape.Getters.Length; i++)
                if (!Set(dict, shape.Names[i], Write(shape.Getters[i](value), depth + 1), false)) return IntPtr.Zero;
            return dict;
        }

        /// <summary>dict[key] = item, dropping our reference to item (and to key when it is ours).</summary>
        static bool Set(IntPtr dict, IntPtr key, IntPtr item, bool ownKey)
        {
            bool ok = key != IntPtr.Zero && item != IntPtr.Zero && PythonApi.DictSet(dict, key, item) == 0;
            if (item != IntPtr.Zero) PythonApi.DecRef(item);
            if (ownKey && key != IntPtr.Zero) PythonApi.DecRef(key);
            if (!ok) PythonApi.DecRef(dict);
            return ok;
        }

        static Shape MakeShape(Type type)
        {
            var properties = new List<PropertyInfo>();
            foreach (var property in type.GetProperties(BindingFlags.Public | BindingFlags.Instance))
                if (property.GetIndexParameters().Length == 0 && property.GetGetMethod() != null) properties.Add(property);
            var shape = new Shape { Names = new IntPtr[properties.Count], Getters = new Func<object, object>[properties.Count] };
            for (int i = 0; i < properties.Count; i++)
            {
                shape.Names[i] = Names.GetOrAdd(PyConvert.SnakeCase(properties[i].Name), PythonApi.NewString);
                shape.Getters[i] = Getter(type, properties[i]);
            }
            return shape;
        }

        static Func<object, object> Getter(Type type, PropertyInfo property)
        {
            try
            {
                var instance = Expression.Parameter(typeof(object), "instance");
                var read = Expression.Property(Expression.Convert(instance, type), property);
                return Expression.Lambda<Func<object, object>>(Expression.Convert(read, typeof(object)), instance).Compile();
            }
            catch (Exception)
            {
                return instance => property.GetValue(instance, null);  // where code cannot be generated
            }
        }

        /// <summary>Drop the cached names; with the GIL held, before the interpreter ends.</summary>
        public static void Release()
        {
            foreach (var name in Names.Values) PythonApi.DecRef(name);
            Names.Clear();
            Shapes.Clear();
        }
    }
}
